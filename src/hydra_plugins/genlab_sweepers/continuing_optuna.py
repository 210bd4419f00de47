"""Optuna's Hydra sweeper, continued where it stopped when its command runs again.

``+sweep=optuna_vae`` keeps its study in ``<sweep dir>/optuna.db``. Run the same command
with the same ``hydra.sweep.dir`` after a stop (Ctrl-C, ``kill -9``, a lost machine) and
the study goes on with its past trials: the sampler proposes from everything measured
so far (seeded afresh from the run's seed and the number of trials, so that it does not
repeat the first run's proposals), only the trials still missing from ``n_trials`` run,
and they take the job numbers after the last trial's, so that no job folder is reused
for other settings. A trial that was running (or queued) when the sweep stopped is
marked failed in the study, tagged ``genlab_stopped``, and its settings are proposed
again first, in a new job folder.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

try:  # the optuna plugin is an optional extra (pip install -e '.[sweep]')
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - then there is nothing to continue
    OptunaSweeper = None

log = logging.getLogger(__name__)
# The user attribute of a trial that was stopped, not failed: it is proposed again.
STOPPED = "genlab_stopped"

if OptunaSweeper is not None:

    class ContinuingOptunaSweeper(OptunaSweeper):
        """`OptunaSweeper` whose study, kept in ``storage``, continues when rerun."""

        def sweep(self, arguments: list[str]) -> None:
            impl = self.sweeper
            sweep_dir = Path(impl.config.hydra.sweep.dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            # As Hydra's basic sweeper does: what the sweep varies, for its jobs to read.
            OmegaConf.save(impl.config, sweep_dir / "multirun.yaml")
            if impl.storage:
                _continue_study(impl)
            return super().sweep(arguments)

    def _continue_study(impl: Any) -> None:
        import optuna
        from hydra.utils import instantiate
        from optuna.trial import Trial, TrialState

        try:
            study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
        except KeyError:  # no such study yet: a first run
            return
        trials = study.trials
        stale = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        finished = sum(t.state.is_finished() and not t.user_attrs.get(STOPPED) for t in trials)
        # Job folders are numbered as the study numbers its trials: the next trial, which
        # is the first stopped one proposed again (the study asks queued trials first),
        # takes the number after every trial so far.
        impl.job_idx = len(trials)
        impl.n_trials = max(0, impl.n_trials - finished)
        sampler = impl.config.hydra.sweeper.get("sampler")
        if sampler is not None and sampler.get("seed") is not None:
            impl.sampler = instantiate(sampler, seed=int(sampler.seed) + len(trials))
        with warnings.catch_warnings():  # enqueue_trial is "experimental" in optuna 2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for trial in stale:
                # (a FrozenTrial has no public id in optuna 2)
                Trial(study, trial._trial_id).set_user_attr(STOPPED, True)
                study.tell(trial.number, state=TrialState.FAIL)
                study.enqueue_trial(trial.params or trial.system_attrs.get("fixed_params", {}))
        log.info(
            "Continuing Optuna study %r: %d trials finished earlier, %d to go from job %d%s.",
            study.study_name,
            finished,
            impl.n_trials,
            impl.job_idx,
            f"; {len(stale)} stopped trial(s) proposed again first" if stale else "",
        )
