"""Reports: a run's (run.py: `routetune report RUN`, `routetune compare`), a study's (study.py:
`routetune report STUDY`), and what they share (render.py)."""
