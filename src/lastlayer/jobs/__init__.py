"""The job service: run a walkthrough-style job module from an options file.

:mod:`~lastlayer.jobs.plan` holds the deploy plan and its rendering, :mod:`~lastlayer.jobs.service`
deploys, supervises, lists, logs and stops, and :mod:`~lastlayer.jobs.task` is the process that runs
one task's ``main(server, log_dir, context)``.
"""
