"""`python -m sana_core.train` (or `accelerate launch -m sana_core.train`): LoRA or full fine-tuning of a Sana DiT
on image + caption folders. `--help` lists every option; `--config FILE` (YAML/JSON) sets any of them."""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .config import parse

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse(argv)
        from .trainer import clear_feature_cache, train

        if cfg.clear_cache and not cfg.data_dir:
            print(clear_feature_cache(cfg))
            return 0
        result = train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in result["outputs"]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
