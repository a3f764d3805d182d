"""The job service: run a walkthrough-style job module from an options file, here or on YARN.

- :mod:`~lastlayer.jobs.spec`: the options file (``poets.json``), declared once and validated.
- :mod:`~lastlayer.jobs.secret_store`: the local secret store the keytab secret comes from.
- :mod:`~lastlayer.jobs.archive`: fetch a job archive (bounded), tell zip from tar, extract it safely.
- :mod:`~lastlayer.jobs.package`: build a reproducible job zip (``lastlayer job package``).
- :mod:`~lastlayer.jobs.plan`: the deploy plan, its statuses and its rendering.
- :mod:`~lastlayer.jobs.state`: a job's state folder, pid files and ``/proc`` utilities.
- :mod:`~lastlayer.jobs.prepare`: everything before the tasks start (checks, login, archive, layout).
- :mod:`~lastlayer.jobs.supervisor`: runs and watches the task processes (also detached).
- :mod:`~lastlayer.jobs.api`: deploy, restart, plan, tasks, task_log, stop, uninstall.
- :mod:`~lastlayer.jobs.task`: the task process and its typed :class:`~lastlayer.jobs.task.TaskDescription`.
- :mod:`~lastlayer.jobs.yarn_spec`: the skein application of a job on YARN, built from its options.
- :mod:`~lastlayer.jobs.yarn`: ``--scheduler=yarn``: each task in a YARN container, followed into the plan.
- :mod:`~lastlayer.jobs.container`: a task's container: its address published, its peers awaited.

A job module defines ``main(server, log_dir, context)`` and may define ``executors(context)``: answer
``"spark"`` to have the workers run as Spark executors driven by worker-0 (the example job
``examples/poets/poets.py`` does when its context asks for ``--engine spark``).
"""
