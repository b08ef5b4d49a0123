"""Hydra multirun through the real CLI: one job per setting, one W&B run per job, grouped."""

from __future__ import annotations


import torch
import yaml

from test_train_helpers import run_cli, short_run_overrides, tiny_data_overrides, wandb_run_contents


def test_multirun_cli_two_jobs_with_wandb_offline(tmp_path_factory, tmp_path):
    data_root = tmp_path_factory.mktemp("synthetic")
    args = ["-m", "dac.o2m.topk=4,6", *tiny_data_overrides(data_root), *short_run_overrides(tmp_path),
            "logger=wandb", "module.num_log_images=2"]
    result = run_cli("dac_detr.train", args, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") >= 2  # a COCO table per job
    assert "wandb sync" in output  # offline: says how to upload

    (sweep,) = (tmp_path / "quickstart" / "multiruns").iterdir()
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0] for d in jobs] == [
        "dac.o2m.topk=4", "dac.o2m.topk=6"]
    runs = [wandb_run_contents(next((d / "wandb").glob("offline-run-*"))) for d in jobs]
    assert len({r["run_id"] for r in runs}) == 2  # one W&B run per job ...
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"].startswith("quickstart/")  # ... in one group
    for run in runs:
        assert run["exit"]  # finished cleanly (wandb.finish per job)
        expected = {"train/loss_step", "train/loss_o2o", "train/loss_o2m", "train/loss_o2o_cls_0", "train/loss_enc_cls",
                    "val/mAP", "val/mAP_50", "val/mAP_75", "val/AR_100", "val/queries_per_object@0.6",
                    "lr-AdamW/backbone", "lr-AdamW/rest"}
        assert expected <= run["history"], sorted(expected - run["history"])
        # media are logged as nested entries: the per-class AP table and validation images with boxes
        assert {"val/per_class_AP/_type", "val/examples/_type", "val/examples/all_boxes"} <= run["history"]
        assert {"dac", "model", "data", "optimizer"} <= run["config"]  # the resolved Hydra config
    # each job's checkpoint remembers its W&B run, so `ckpt_path=last` continues that run
    for job, run in zip(jobs, runs):
        checkpoint = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["dac_detr"]["wandb_run_id"] == run["run_id"]


def test_optuna_search_over_the_one_to_many_settings(tmp_path_factory, tmp_path):
    """hparams_search=dac_o2m: two Optuna trials; the sweeper reads val/mAP returned by main()."""
    data_root = tmp_path_factory.mktemp("synthetic")
    args = ["-m", "hparams_search=dac_o2m", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
            *tiny_data_overrides(data_root), *short_run_overrides(tmp_path)]
    result = run_cli("dac_detr.train", args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (sweep,) = (tmp_path / "quickstart" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"dac.o2m.threshold", "dac.o2m.topk", "dac.o2m.max_positives",
                                        "dac.o2m.rank_tau", "dac.o2m.loss_scale"}
    assert 0.0 <= best["best_value"] <= 1.0
    trial_overrides = [yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) for d in sorted(sweep.iterdir()) if d.is_dir()]
    assert len(trial_overrides) == 2 and all(any(o.startswith("dac.o2m.topk=") for o in t) for t in trial_overrides)

    # the study persists by default (sqlite under the log folder): a stopped sweep can continue
    import optuna

    database = tmp_path / "quickstart" / "optuna" / "dac_o2m.db"
    assert database.is_file(), f"no study database at {database}"
    study = optuna.load_study(study_name="dac_o2m", storage=f"sqlite:///{database}")
    finished = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2
    assert abs(study.best_value - best["best_value"]) < 1e-9
