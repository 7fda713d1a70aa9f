"""Campaigns: a scan of ensembles expanded into Slurm jobs with dependencies.

A campaign YAML (format in ``docs/HPC.md``) names a base hpcflow config, scan axes (e.g.
``beta: [5.8, 6.0]``), a number of independent chains per scan point and stages (``train``
then ``sample``) with their resources. ``hpcflow campaign CAMPAIGN.yaml`` expands it into one
batch script per stage that calls only the ``hpcflow`` CLI and submits it as a job array (chain
``i`` = array index ``i``) with ``sbatch --array=... --dependency=afterok:<upstream array>``, so
sampling starts only after the training succeeded. Running it again resubmits exactly the unfinished work: stages that finished are
skipped, jobs still queued or running are kept, anything else (failed, cancelled, lost) is
submitted again, with ``--resume`` so it continues from its checkpoints.

* :mod:`.spec`: the campaign YAML -> frozen dataclasses (every error before any submission),
  chains and seeds, each job's complete hpcflow config;
* :mod:`.slurm`: batch scripts, ``sbatch``/``afterok`` submission and resubmission, state file;
* :mod:`.status`: per-chain job states, configurations and acceptance, the status table;
* :mod:`.cli`: ``hpcflow campaign [submit|status] CAMPAIGN.yaml``.

Book-keeping under the campaign directory ``dir``::

    campaign_state.json            array task ids <array>_<index> per chain/stage (atomic writes)
    configs/<chain>.<stage>.yaml   the complete hpcflow config of the job (validated before submission)
    scripts/<stage>.sbatch         the batch script (a job array over the chains)
    status/<chain>.<stage>.json    written by the job itself: running / done / requeued / failed
    logs/<stage>.<array>_<index>.out
    chains/<chain>/                output.dir of the chain (ensemble, checkpoints, summary)
"""

from __future__ import annotations

from .cli import main
from .slurm import job_paths, render_script, submit
from .spec import (
    Campaign,
    CampaignError,
    Chain,
    Resources,
    Stage,
    expand_chains,
    job_config,
    load_campaign,
    parse_campaign,
)
from .status import campaign_status, format_status

__all__ = [
    "Campaign",
    "CampaignError",
    "Chain",
    "Resources",
    "Stage",
    "campaign_status",
    "expand_chains",
    "format_status",
    "job_config",
    "job_paths",
    "load_campaign",
    "main",
    "parse_campaign",
    "render_script",
    "submit",
]
