"""Scores a person can trust, from the cached features of a run (no network pass).

One module per concern, each a set of pure functions of numpy arrays:

* :mod:`.calibration`: a temperature fitted on held-out logits (folded into the exported last
  layer) and the expected calibration error before and after.
* :mod:`.ood`: "none of the above", a distance to the training classes computed inside the
  exported model, and its threshold.
* :mod:`.labels`: suspected wrong labels from out-of-fold probabilities (confident learning).
* :mod:`.duplicates`: near-duplicate images (an exact blocked search) and the groups they form.
* :mod:`.stage`: the run's trust stage, which gathers the features once and calls the others;
  :mod:`.summary` its entry of the run summary, :mod:`.view` its section of the report.
* :mod:`.memo`: a content-addressed memo of results derived from the cache (the stage's findings,
  kept by :mod:`.stored`, and the report's charts), so that a warm re-run reads them back.
"""
