"""The run report: one self-contained HTML page (``page``) made from a checked run summary (``input``)."""
