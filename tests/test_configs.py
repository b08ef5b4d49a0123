"""Every config composes with the real Hydra and holds the official numbers (docs/method.md,
Training recipe)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dac_detr.utils.config_checks import ConfigError, check_config
from test_train_helpers import COCO_EXPERIMENTS, EXPERIMENTS, compose_train, run_cli


def test_all_experiments_are_there():
    bases = ["r50_12ep", "r50_24ep", "swin_l", "swin_l_24ep"]
    expected = {"quickstart", *bases, *(f"{b}_baseline" for b in bases), *(f"{b}_dac_cdn" for b in bases)}
    assert expected <= set(EXPERIMENTS)


# What each experiment is meant to set, stated here rather than derived from its name:
# (epochs, StepLR step_size, backbone, DAC on, classification loss).
EXPECTED = {
    "quickstart": (10, 8, "resnet18", True, "ia_bce"),
    "r50_12ep": (12, 11, "resnet50", True, "ia_bce"),
    "r50_12ep_baseline": (12, 11, "resnet50", False, "ia_bce"),
    "r50_12ep_dac_cdn": (12, 11, "resnet50", True, "focal"),
    "r50_24ep": (24, 20, "resnet50", True, "ia_bce"),
    "r50_24ep_baseline": (24, 20, "resnet50", False, "ia_bce"),
    "r50_24ep_dac_cdn": (24, 20, "resnet50", True, "focal"),
    "swin_l": (12, 11, "swin_large", True, "ia_bce"),
    "swin_l_baseline": (12, 11, "swin_large", False, "ia_bce"),
    "swin_l_dac_cdn": (12, 11, "swin_large", True, "focal"),
    "swin_l_24ep": (24, 20, "swin_large", True, "ia_bce"),
    "swin_l_24ep_baseline": (24, 20, "swin_large", False, "ia_bce"),
    "swin_l_24ep_dac_cdn": (24, 20, "swin_large", True, "focal"),
    "study/dac": (4, 3, "resnet18", True, "ia_bce"),
    "study/baseline": (4, 3, "resnet18", False, "ia_bce"),
    "study/dac_cdn": (4, 3, "resnet18", True, "focal"),
    "study/ablation": (4, 3, "resnet18", True, "ia_bce"),
}


def _backbone(cfg) -> str:
    return str(cfg.backbone.get("name") or cfg.backbone.get("model_name"))


def test_every_experiment_has_its_expected_values():
    assert set(EXPERIMENTS) | {"study/dac", "study/baseline", "study/dac_cdn", "study/ablation"} == set(EXPECTED)


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], output_dir=tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    epochs, step_size, backbone, dac, cls_loss = EXPECTED[experiment]
    assert (cfg.trainer.max_epochs, cfg.scheduler.step_size) == (epochs, step_size)
    assert _backbone(cfg).startswith(backbone), _backbone(cfg)
    assert (cfg.dac.enabled, cfg.loss.cls_loss) == (dac, cls_loss)
    if experiment.startswith("study/"):
        assert container["task_name"] == "study" and cfg.study_arm == experiment.split("/")[1].replace("ablation", "dac")
        return
    assert container["task_name"] == experiment
    check_config(cfg)
    assert cfg.model.dac_enabled == cfg.dac.enabled
    assert cfg.trainer.gradient_clip_val == 0.1 and cfg.module.lr_linear_proj_mult == 0.1
    if experiment != "quickstart":  # the quickstart trains its backbone from scratch at a higher lr
        assert cfg.optimizer.lr == 2e-4 and cfg.module.lr_backbone == 2e-5


def test_quickstart_is_the_default(tmp_path):
    cfg = compose_train([], output_dir=tmp_path)
    assert cfg.task_name == "quickstart"
    assert cfg.data._target_.endswith("SyntheticCocoDataModule")
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.model.hidden_dim < 256  # the tiny model
    assert "progress_bar" in cfg.callbacks


@pytest.mark.parametrize("experiment", COCO_EXPERIMENTS)
def test_coco_experiments_follow_the_official_recipe(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}"], output_dir=tmp_path)
    epochs = 24 if "24ep" in experiment else 12
    assert cfg.trainer.max_epochs == epochs
    assert cfg.scheduler.step_size == (20 if epochs == 24 else 11)
    assert cfg.trainer.devices * cfg.data.batch_size == 16  # 8 GPUs x 2 images
    assert cfg.data._target_.endswith("CocoDataModule") and "Synthetic" not in cfg.data._target_
    assert cfg.model.num_queries == 900 and cfg.model.hidden_dim == 256
    assert cfg.postprocess.method == "nms" and cfg.postprocess.nms_iou == 0.8
    assert "wandb" in cfg.logger
    assert cfg.dac.enabled == (not experiment.endswith("_baseline"))
    assert cfg.loss.cls_loss == ("focal" if experiment.endswith("_dac_cdn") else "ia_bce")
    is_swin = experiment.startswith("swin_l")
    assert ("wap" in cfg.backbone._target_.lower() or "swin" in cfg.backbone._target_.lower()) == is_swin
    if experiment.startswith("swin_l_24ep"):
        assert cfg.optimizer.weight_decay == 0.05 and cfg.backbone.drop_path_rate == 0.5
    else:
        assert cfg.optimizer.weight_decay == 1e-4
    if experiment.startswith("swin_l") and not experiment.startswith("swin_l_24ep"):
        assert cfg.backbone.drop_path_rate == 0.2


def test_official_dac_defaults(tmp_path):
    cfg = compose_train(["experiment=r50_12ep"], output_dir=tmp_path)
    o2m = cfg.dac.o2m
    assert list(o2m.score_weights) == [0.3, 0.7]
    assert (o2m.threshold, o2m.topk, o2m.max_positives, o2m.rank_tau) == (0.4, 6, 75, 1.5)
    assert o2m.box_source == "o_decoder" and o2m.low_quality_matches is True
    assert abs(o2m.loss_scale - 1 / 3) < 1e-12
    assert cfg.dac.c_decoder.share_layer0_self_attn is True


# Each debug mode and the one value it is meant to set.
DEBUG_MODES = {"default": ("trainer.detect_anomaly", True), "fdr": ("trainer.fast_dev_run", True),
               "limit": ("trainer.limit_train_batches", 3), "overfit": ("trainer.overfit_batches", 1),
               "profiler": ("trainer.profiler", "simple")}


@pytest.mark.parametrize("name", sorted(DEBUG_MODES))
def test_debug_modes_compose(name, tmp_path):
    cfg = compose_train([f"debug={name}"], output_dir=tmp_path)
    assert cfg.data.num_workers == 0 and cfg.logger == {}
    key, value = DEBUG_MODES[name]
    assert OmegaConf.select(cfg, key) == value


# Each group choice and one value it is meant to set.
GROUP_CHOICES = {
    "trainer=cpu": ("trainer.accelerator", "cpu"),
    "trainer=gpu": ("trainer.accelerator", "gpu"),
    "trainer=ddp": ("trainer.strategy", "ddp"),
    "trainer=ddp_sim": ("trainer.strategy", "ddp_spawn"),
    "logger=wandb": ("logger.wandb._target_", "lightning.pytorch.loggers.WandbLogger"),
    "logger=csv": ("logger.csv._target_", "lightning.pytorch.loggers.CSVLogger"),
    "logger=none": ("logger", {}),
    "callbacks=none": ("callbacks", {}),
    "postprocess=topk": ("postprocess.method", "topk"),
    "dac=off": ("model.dac_enabled", False),
    "loss=focal": ("loss.cls_loss", "focal"),
    "model=dac_detr": ("model.num_queries", 900),
    "backbone=r50": ("backbone.name", "resnet50"),
    "ema.enabled=true": ("ema.enabled", True),
}


@pytest.mark.parametrize("choice", sorted(GROUP_CHOICES))
def test_group_choices_compose(choice, tmp_path):
    cfg = compose_train([choice], output_dir=tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    key, value = GROUP_CHOICES[choice]
    assert OmegaConf.select(cfg, key) == value


def test_hparams_search_and_slurm_launcher_compose():
    cfg = compose_train(["hparams_search=dac_o2m", "hydra/launcher=slurm"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.study_name == "dac_o2m"
    assert set(sweeper.params) >= {"dac.o2m.threshold", "dac.o2m.topk"}
    assert cfg.optimized_metric == "val/mAP"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.mode.name == "MULTIRUN" or str(cfg.hydra.mode).endswith("MULTIRUN")


@pytest.mark.parametrize("name", ["eval", "predict", "export"])
def test_entry_point_configs_compose(name):
    overrides = {"eval": ["ckpt=x.ckpt"], "predict": ["ckpt=x.ckpt", "images=in", "out=out"], "export": ["ckpt=x.ckpt"]}
    cfg = compose_train(overrides[name], config_name=name)
    assert cfg.ckpt == "x.ckpt"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dac.o2m.topk=abc", "dac.o2m.topk"),
        ("dac.o2m.threshold=1.5", "dac.o2m.threshold"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("trainer.precision=bf17", "trainer.precision"),
        ("dac.o2m.score_weights=[0.3]", "dac.o2m.score_weights"),
    ],
)
def test_wrong_types_give_a_clear_error(override, message, tmp_path):
    cfg = compose_train([override], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_config(cfg)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["experiment=does_not_exist"], "Could not find 'experiment/does_not_exist'"),
        (["no_such_key=1"], "Could not override 'no_such_key'"),
        (["dac.o2m.topk=abc"], "Config key `dac.o2m.topk` is 'abc'"),
    ],
)
def test_bad_override_on_the_cli_ends_with_a_clear_message(args, expected, tmp_path):
    result = run_cli("dac_detr.train", [*args, f"paths.log_dir={tmp_path}"], cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output, output[-3000:]
    assert "site-packages" not in output  # no deep traceback from inside libraries
