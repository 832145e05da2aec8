"""`routetune sweep`: optuna studies whose trials are routetune runs (docs/sweep.md).

* ``config.py``: the sweep file (base config, search space, objectives, budget, storage);
* ``space.py``: a trial's setting from the space (conditions, simplexes);
* ``study.py``: the study folder and storage, the objectives read from a run on dev data;
* ``run.py``: the trial loop (budget, heartbeats, retries that continue a dead trial's run);
* ``confirm.py``: the chosen settings and baselines on test, K seeds, intervals;
* ``law.py``: a data-mixing law over the trials, its prediction checked by a run.
"""
