#!/usr/bin/env python
"""Convert an official DAC-DETR checkpoint (huzhengdongcs/DAC-DETR) to dac-detr's format.

    python scripts/convert_official.py checkpoint0011.pth dac_detr_r50_official.pth

The output holds {'model': state_dict} with our parameter names; load it with
``model.load_state_dict(torch.load(dst, weights_only=True)['model'])`` into a DACDETR built with the
official sizes (num_classes=91) and the matching backbone.
"""

from __future__ import annotations

import argparse
import sys

from dac_detr.models.convert import NotAnOfficialCheckpointError, convert_official_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint (.pth saved by the official main.py)")
    parser.add_argument("dst", help="where to write the converted state dict")
    args = parser.parse_args(argv)
    try:
        state_dict = convert_official_checkpoint(args.src, args.dst)
    except (NotAnOfficialCheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(state_dict)} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
