"""Run many mergekit YAMLs in one process (mergekit's venv): one start-up instead of one per config.

    python bench/_mergekit_runner.py jobs.json   # [[yaml, out_dir], ...]; writes jobs.json.status
"""
import json
import sys
import traceback

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def main(path: str) -> int:
    jobs = json.load(open(path))
    status = {}
    for cfg_path, out in jobs:
        try:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(open(cfg_path)))
            run_merge(cfg, out, MergeOptions(quiet=True, random_seed=0, write_model_card=False))
            status[cfg_path] = "ok"
        except Exception as exc:  # recorded per config: the bench reports it
            status[cfg_path] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            traceback.print_exc()
    json.dump(status, open(path + ".status", "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
