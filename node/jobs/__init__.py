"""Jobs: a series becomes complete, is decided, analysed and exported, unattended and restart-safe.

``config`` the config tables; ``states`` the state machine; ``store`` the jobs table; ``intake`` completion
and job creation; ``worker`` one analysis; ``export`` results to destinations; ``retention`` deleting old
images; ``scheduler`` runs them all inside ``uad-node serve``.
"""
