"""Library entry points of the experiment scripts: ``run(config, workdir)`` per job.

``experiments/*.py`` only parse flags and call these, so notebooks and tests call the
same functions.
"""
