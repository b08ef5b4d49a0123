"""The data configs (conf/data/*.yaml) through real Hydra: composition and instantiation."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_hydra_config_builds_a_working_datamodule(tmp_path):
    """conf/data/synthetic.yaml through real Hydra instantiation, generating in prepare_data."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import dac_detr.conf

    cfg = OmegaConf.load(Path(dac_detr.conf.__file__).parent / "data" / "synthetic.yaml")
    cfg.root = str(tmp_path / "syn")
    cfg.num_train, cfg.num_val, cfg.num_workers, cfg.batch_size = 6, 3, 0, 2
    dm = instantiate(cfg)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 6 and dm.class_names[0] == "square" and dm.label_to_category_id(5) == 6
    images, mask, targets = next(iter(dm.train_dataloader()))
    assert images.shape[0] == 2 and max(images.shape[-2:]) <= 267
    images, mask, targets = next(iter(dm.val_dataloader()))
    assert images.shape[-2:] == (128, 128) and not mask.any()
    assert len(dm.coco_gt("val").getImgIds()) == 3


def test_coco_config_composes_with_the_official_recipe(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import dac_detr.conf

    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
    cfg.data = OmegaConf.load(Path(dac_detr.conf.__file__).parent / "data" / "coco.yaml")
    dm = instantiate(cfg.data)
    assert dm.root == tmp_path / "coco" and dm.label_mapping == "raw" and dm.drop_last
    assert dm.train_transforms.transforms[1].transforms[0].sizes == list(range(480, 801, 32))
    assert dm.val_transforms.transforms[0].sizes == [800] and dm.val_transforms.transforms[0].max_size == 1333
    from dac_detr.data import DataError

    with pytest.raises(DataError, match="data=synthetic"):
        dm.setup("fit")


def test_custom_data_config_composes(tmp_path):
    """data=custom: the COCO recipe, contiguous labels, the root required."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("dac_detr.conf", version_base="1.3"):
        # With a COCO experiment, as the README shows (the default quickstart sets synthetic-only keys).
        cfg = compose("train", overrides=["experiment=r50_12ep", "data=custom", f"data.root={tmp_path}"])
    dm = instantiate(cfg.data)
    assert dm.root == tmp_path and dm.label_mapping == "contiguous"
    assert dm.val_transforms.transforms[0].sizes == [800]
