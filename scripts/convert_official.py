#!/usr/bin/env python
"""Convert an official DAC-DETR checkpoint (huzhengdongcs/DAC-DETR) to dac-detr's format.

    python scripts/convert_official.py checkpoint0011.pth dac_detr_r50_official.pth

The output holds {'model': state_dict} with our parameter names; load it with
``model.load_state_dict(torch.load(dst, weights_only=True)['model'])`` into a DACDETR built with the
official sizes (num_classes=91) and the matching backbone.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dac_detr.models.convert import convert_official_checkpoint
from dac_detr.utils.task import task_wrapper


@task_wrapper
def main(argv: list[str] | None = None) -> int:
    """Returns 0; a missing, unreadable or non-official file ends with its message and exit code 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint (.pth saved by the official main.py)")
    parser.add_argument("dst", help="where to write the converted state dict")
    args = parser.parse_args(argv)
    state_dict = convert_official_checkpoint(args.src, args.dst)
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    sys.exit(main())
