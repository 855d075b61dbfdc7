# ruff: noqa: F811  (the digits/buffer fixtures are imported from test_distill and requested by name)
"""Bad inputs of the Python API: DistillConfig's integer fields and eval_models string, damaged checkpoints."""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from test_distill import _cfg, buffer, digits  # noqa: F401  (fixtures)

from haba_fast import checkpoint as ck
from haba_fast.checkpoint import flag_name
from haba_fast.distill import DistillConfig, distill, eval_config

QUIET = dict(progress=False, log=lambda s: None)

# ---------------------------------------------------------------------------------------------------------------------
# DistillConfig: integer fields

INT_TYPES = ("int", "Optional[int]")
INT_FIELDS = [f for f in dataclasses.fields(DistillConfig) if f.type in INT_TYPES]


def test_every_integer_annotation_is_one_the_check_reads():
    """A field spelled otherwise (``int | None``) would escape validate's walk over the annotations."""
    spelled = {f.name: f.type for f in dataclasses.fields(DistillConfig) if "int" in str(f.type).lower()}
    assert spelled and all(t in INT_TYPES for t in spelled.values()), spelled
    assert {"ipc", "iterations", "seed", "batch_syn", "syn_steps", "max_files"} <= {f.name for f in INT_FIELDS}


@pytest.mark.parametrize("name", [f.name for f in INT_FIELDS])
def test_every_integer_field_refuses_non_integers(name):
    field = next(f for f in INT_FIELDS if f.name == name)
    bad = [2.5, 2.0, "2", True, math.nan] + ([] if field.type == "Optional[int]" else [None])
    for value in bad:
        with pytest.raises(ValueError) as info:
            DistillConfig(**{name: value}).validate()
        assert str(info.value) == f"{flag_name(name)} must be an integer, got {value!r}", (value, info.value)


def test_integer_fields_keep_what_ran():
    cfg = DistillConfig(ipc=np.int64(2), iterations=3, batch_syn=None).validate()
    assert cfg.ipc == 2 and type(cfg.ipc) is int  # a NumPy integer is an integer, recorded as a plain int
    assert cfg.to_dict()["ipc"] == 2 and cfg.batch_syn is None
    with pytest.raises(ValueError, match=r"^--ipc must be an integer, got 2\.7$"):
        DistillConfig(ipc=2.7).validate()
    with pytest.raises(ValueError, match=r"^--Iteration must be an integer, got 2\.5$"):
        DistillConfig(iterations=2.5).validate()
    with pytest.raises(ValueError, match=r"^--ipc must be >= 1, got 0$"):  # the range checks stay
        DistillConfig(ipc=0).validate()


# ---------------------------------------------------------------------------------------------------------------------
# DistillConfig: eval_models as a string


@pytest.mark.parametrize(
    "given,models",
    [("ConvNet", ("ConvNet",)), (" ConvNet , MLP,", ("ConvNet", "MLP")), ("", ()), (("MLP",), ("MLP",))],
)
def test_eval_models_string_is_split_at_commas(given, models):
    cfg = DistillConfig(eval_models=given).validate()
    assert cfg.eval_models == models
    assert eval_config(cfg).models == (models or eval_config(DistillConfig()).models)


def test_eval_models_string_names_an_unknown_network():
    with pytest.raises(ValueError, match="unknown --eval-models network 'Foo'"):
        DistillConfig(eval_models="ConvNet,Foo").validate()


# ---------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints


@pytest.fixture(scope="module")
def one_run(digits, buffer, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_run")
    distill(_cfg(iterations=1), digits, buffer, out, **QUIET)
    return out


def _damaged(run, tmp_path, damage):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    state = torch.load(dst / ck.CHECKPOINT_NAME, weights_only=True)
    damage(state)
    torch.save(state, dst / ck.CHECKPOINT_NAME)
    return dst


def _first_synthetic(state):
    return next(iter(state["synthetic"]))


DAMAGES = {
    "syn_lr nan": (lambda s: s["syn_lr"].fill_(math.nan), "syn_lr holds NaN or inf"),
    "syn_lr inf": (lambda s: s["syn_lr"].fill_(math.inf), "syn_lr holds NaN or inf"),
    "synthetic nan": (
        lambda s: s["synthetic"][_first_synthetic(s)].view(-1)[0].fill_(math.nan),
        r"synthetic\['\w+'\] holds NaN or inf",
    ),
    "optimizer moment nan": (
        lambda s: next(iter(s["opt_img"]["state"].values()))["momentum_buffer"].view(-1)[0].fill_(math.nan),
        r"opt_img\['state'\]\[0\]\['momentum_buffer'\] holds NaN or inf",
    ),
    "iteration str": (lambda s: s.update(iteration="x"), "iteration is 'x', not an integer"),
    "rng size": (
        lambda s: s["rng"].update(distill=torch.zeros(3, dtype=torch.uint8)),
        r"rng\['distill'\] is not a random generator's state",
    ),
    "rng dtype": (
        lambda s: s["rng"].update(eval=s["rng"]["eval"].float()),
        r"rng\['eval'\] is not a random generator's state",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_checkpoint_is_refused_naming_file_and_entry(digits, buffer, one_run, tmp_path, case):
    damage, message = DAMAGES[case]
    run = _damaged(one_run, tmp_path, damage)
    with pytest.raises(ValueError, match=message) as info:
        distill(_cfg(iterations=2), digits, buffer, run, resume=True, **QUIET)
    assert str(run / ck.CHECKPOINT_NAME) in str(info.value)


def test_undamaged_copy_resumes(digits, buffer, one_run, tmp_path):
    """The damage above is what the refusals are about: the same copy, left as it is, resumes."""
    run = _damaged(one_run, tmp_path, lambda s: None)
    assert distill(_cfg(iterations=2), digits, buffer, run, resume=True, **QUIET).iterations == 2


def test_garbage_checkpoint_gives_no_weights_only_advice(tmp_path):
    path = tmp_path / ck.CHECKPOINT_NAME
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="is corrupt") as info:
        ck.load_checkpoint(path)
    assert "weights_only" not in str(info.value) and str(path) in str(info.value)


BOOL_FIELDS = [f.name for f in dataclasses.fields(DistillConfig) if f.type in ("bool", "Optional[bool]")]


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_every_bool_field_refuses_non_bools(name):
    """A string such as "no" would read as on."""
    for value in ("no", 0, 1.0):
        with pytest.raises(ValueError, match=f"must be True or False, got {value!r}"):
            DistillConfig(**{name: value}).validate()


def test_a_resume_state_given_as_a_synthetic_set_says_what_it_is(one_run):
    from haba_fast.factorization import load_synthetic

    with pytest.raises(ValueError, match="is a distillation run's resume state .* give the run's synthetic.pt"):
        load_synthetic(one_run / ck.CHECKPOINT_NAME)
