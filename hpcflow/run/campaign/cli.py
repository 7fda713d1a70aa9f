"""``hpcflow campaign``: its own argument parser (``hpcflow.run.cli`` hands it the arguments)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .slurm import submit
from .spec import CampaignError, load_campaign
from .status import campaign_status, format_status

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``hpcflow campaign [submit] CAMPAIGN.yaml [--dry-run]`` / ``hpcflow campaign status CAMPAIGN.yaml``.

    Exit status: 0 success, 2 bad input (campaign file) or a failed submission.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="hpcflow campaign",
                                description="expand a campaign into Slurm jobs, submit, resubmit, status")
    p.add_argument("action", nargs="?", choices=("submit", "status"), default="submit",
                   help="submit (default; resubmits unfinished chains) or status")
    p.add_argument("campaign", help="campaign YAML file")
    p.add_argument("--dry-run", action="store_true", help="print the batch scripts, submit nothing")
    p.add_argument("--json", action="store_true", help="status as JSON")
    pos = [a for a in args if not a.startswith("-")]
    if pos and pos[0] not in ("submit", "status"):
        args = ["submit", *args]  # 'hpcflow campaign FILE' means submit
    ns = p.parse_args(args)
    try:
        c = load_campaign(ns.campaign)
        if ns.action == "status":
            rows = campaign_status(c)
            print(json.dumps(rows, indent=2) if ns.json else format_status(c, rows))
            return 0
        submit(c, dry_run=ns.dry_run)
        return 0
    except CampaignError as e:
        print(f"hpcflow campaign: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. '--dry-run | head': the reader left; no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
