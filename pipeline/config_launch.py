"""The `launch` section of the run config: where and how stages run (this machine, torchrun, SLURM)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator

from pipeline.config_errors import Section


def _no_control_chars(value: str, what: str) -> str:
    # A newline in an #SBATCH value would start a new line of the batch script: a shell command.
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"{what} must not contain newlines or control characters")
    return value


class SlurmConfig(Section):
    partition: str | None = Field(
        None, description="Partition of the train job (and of all jobs without cpu_partition); null: the "
        "cluster's default.")
    cpu_partition: str | None = Field(
        None, description="Partition of the CPU stages (shard, tokenize, consolidate, evaluate); null: "
        "partition.")
    account: str | None = Field(None, description="Account charged for the jobs (sbatch --account).")
    qos: str | None = Field(None, description="Quality of service (sbatch --qos).")
    time: str = Field(
        "4:00:00", description="Time limit of each job, in sbatch --time syntax (minutes, H:MM:SS, "
        "D-HH:MM:SS).")
    cpus_per_task: int | None = Field(
        None, ge=1, le=100_000,
        description="CPUs per task; the train job has one task per node. null: the cluster's "
        "default.")
    mem: str | None = Field(
        None, description="Memory per node, in sbatch --mem syntax (e.g. 64G); null: the cluster's default.")
    constraint: str | None = Field(None, description="Node features the jobs need (sbatch --constraint).")
    exclusive: bool = Field(False, description="Train job: whole nodes only (sbatch --exclusive).")
    gpus_per_node: int | None = Field(
        None, ge=0, le=1024, description="GPUs per node of the jobs on the GPU partition (train; evaluate "
        "of a large model); null: launch.nproc_per_node of them, none when train.device is cpu.")
    large_model_gb: float = Field(
        2.0, ge=0, le=1e6, description="Stages that need a GPU only for large models (evaluate) go to the "
        "GPU partition, with GPUs, when the model's weight files exceed this many GB (a hub id, whose size "
        "is unknown here, counts as large).")
    signal_lead_seconds: int = Field(
        120, ge=0, le=86_400,
        description="SLURM sends SIGUSR2 this many seconds before the time limit (sbatch "
        "--signal); all ranks of the train job then save one checkpoint at the next step boundary, and the "
        "job requeues itself and resumes there. The train job warns when its slowest step plus a checkpoint "
        "takes longer.")
    max_array_tasks: int = Field(
        64, ge=1, le=100_000,
        description="shard and tokenize run as job arrays with at most this many tasks (each takes "
        "every k-th source file or shard piece); only the pieces without a current completion marker are "
        "submitted.")
    max_requeues: int = Field(
        3, ge=0, le=1000,
        description="Times a job is requeued after such a stop signal (time limit, preemption); "
        "then it fails, and `ftpipe submit` resumes it.")
    setup: list[str] = Field(
        default_factory=list, description="Shell lines run in each batch script before the stage (module "
        "load, source venv/bin/activate). Never sent to MLflow; lines that set *TOKEN*/*SECRET*/*PASSWORD*/"
        "*KEY* variables get a warning: export those in the submitting shell instead.")
    extra_directives: list[str] = Field(
        default_factory=list, description="More sbatch options, each 'name=value' or 'name' (e.g. "
        "'reservation=big', 'requeue'), for every job.")

    @field_validator("partition", "cpu_partition", "account", "qos", "time", "mem", "constraint")
    @classmethod
    def _one_line(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _no_control_chars(value, info.field_name)

    @field_validator("setup", "extra_directives")
    @classmethod
    def _lines(cls, value: list[str], info: ValidationInfo) -> list[str]:
        return [_no_control_chars(line, info.field_name) for line in value]

    @field_validator("extra_directives")
    @classmethod
    def _directive_names(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(=.*)?", item.lstrip("-")):
                raise ValueError(f"{item!r} is not an sbatch option ('name=value' or 'name')")
        return value


class LaunchConfig(Section):
    backend: Literal["local", "torchrun", "slurm"] = Field(
        "local", description="local: every stage in this process; torchrun: train under torchrun; "
        "slurm: `ftpipe submit` sends every stage to SLURM, train as srun + torchrun per node.")
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] | Literal["gpu"] = Field(
        1, description="torchrun: ranks per node, or 'gpu': one per visible GPU (torchrun's convention; "
        "SLURM then needs launch.slurm.gpus_per_node).")
    nnodes: int = Field(1, ge=1, le=100_000, description="torchrun: nodes.")
    node_rank: int = Field(0, ge=0, description="torchrun: this node's rank (multi-node, static rendezvous).")
    rdzv_endpoint: str | None = Field(
        None, description="torchrun: HOST:PORT of the rendezvous (multi-node); null: localhost.")
    local_addr: str | None = Field(
        None, description="torchrun: the address other nodes reach this one at (multi-node); null: the "
        "hostname's. The SLURM backend sets it to the node's NodeAddr.")
    max_restarts: int = Field(
        0, ge=0, le=1000,
        description="torchrun: restarts of all ranks after a rank fails (on one node as fresh "
        "torchrun launches, across nodes torchrun's own); training resumes from the latest complete "
        "checkpoint.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, le=1_000_000, description="Memory of one GPU in GiB: `ftpipe plan` recommends the "
        "strategy, micro batch and activation checkpointing that fit it.")
    slurm: SlurmConfig = Field(
        default_factory=SlurmConfig, description="backend slurm: how `ftpipe submit` asks for resources.")


def ranks_per_node(launch: LaunchConfig, strategy: str, device: str) -> int:
    """launch.nproc_per_node; for 'gpu' (counted where the ranks start) 1, the least it can be."""
    if launch.nproc_per_node != "gpu":
        return launch.nproc_per_node
    if launch.backend == "local" or strategy == "single" or device == "cpu":
        raise ValueError("launch.nproc_per_node 'gpu' (one rank per GPU) needs launch.backend torchrun or "
                         "slurm, train.strategy ddp, fsdp or deepspeed, and train.device auto or cuda")
    if launch.backend == "slurm" and launch.slurm.gpus_per_node is None:
        raise ValueError("launch.nproc_per_node 'gpu' under SLURM needs launch.slurm.gpus_per_node "
                         "(the GPUs each node's job asks for)")
    return 1
