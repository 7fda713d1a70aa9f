"""Configuration: valid files load, overrides apply, and every kind of bad input gets one
clear line naming the file, the key, the bad value and what is allowed."""

from __future__ import annotations

import pytest
import yaml

from hpcflow.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    default_yaml,
    load_config,
)


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_are_complete_and_reload(tmp_path):
    """`hpcflow config --defaults` output is a valid config equal to the defaults."""
    text = default_yaml()
    cfg = load_config(write(tmp_path, text))
    assert cfg == Config()
    # every key carries a comment
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert all("#" in ln for ln in body)


def test_stable_dotted_keys(tmp_path):
    path = write(tmp_path, """
lattice: {shape: [4, 4, 4, 8]}
group: su3
action: {beta: 5.7}
algorithm: heatbath
seed: 7
precision: float32
grid: [1, 1, 2, 2]
output: {dir: out/x}
""")
    cfg = load_config(path)
    assert cfg.lattice.shape == (4, 4, 4, 8) and cfg.nd == 4
    assert cfg.group == "su3" and cfg.n_colors == 3
    assert cfg.action.beta == 5.7 and cfg.algorithm == "heatbath" and cfg.seed == 7
    assert cfg.precision == "float32" and cfg.grid == (1, 1, 2, 2) and cfg.output.dir == "out/x"
    assert cfg.source == path


def test_set_overrides(tmp_path):
    path = write(tmp_path, "action: {beta: 2.0}\n")
    cfg = load_config(path, ["action.beta=3.0", "lattice.shape=[6,6]", "hmc.integrator=leapfrog"])
    assert cfg.action.beta == 3.0 and cfg.lattice.shape == (6, 6) and cfg.hmc.integrator == "leapfrog"


def test_frozen():
    cfg = Config()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_scientific_notation_without_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; a physicist writes it anyway
    assert config_from_dict({"train": {"lr": "1e-3"}}).train.lr == 1e-3


def test_mixed_pattern_string_form():
    cfg = config_from_dict({"algorithm": "mixed", "mixed": {"pattern": "flow, heatbath heatbath"}})
    assert cfg.mixed.pattern == ("flow", "heatbath", "heatbath")


BAD = [
    # (yaml text or None, overrides, fragments that the one-line message must contain)
    ("lattice: {shape: [8, 8]\n", [], ["malformed YAML", "line"]),
    ("- 1\n- 2\n", [], ["top level must be a mapping"]),
    ("lattice: {shape: [8, -8]}\n", [], ["lattice.shape[1]", "-8", ">= 2"]),
    ("lattice: {shape: [8, 8, 8]}\n", [], ["lattice.shape", "2 (2D) or 4 (4D)"]),
    ("lattice: {shape: 8}\n", [], ["lattice.shape", "8"]),
    ("lattice: {shape: [8, 8.5]}\n", [], ["lattice.shape[1]", "8.5", "integer"]),
    ("group: su4\n", [], ["'group'", "su4", "u1, su2, su3"]),
    ("action: {beta: -1}\n", [], ["action.beta", "-1", "> 0"]),
    ("action: {beta: hot}\n", [], ["action.beta", "hot", "number"]),
    ("action: {beta: .nan}\n", [], ["action.beta", "finite number"]),
    ("algorithm: metropolis\n", [], ["'algorithm'", "metropolis", "hmc, heatbath, flow, mixed"]),
    ("seed: -5\n", [], ["'seed'", "-5", ">= 0"]),
    ("seed: true\n", [], ["'seed'", "true", "integer"]),
    ("precision: float16\n", [], ["'precision'", "float16", "float64, float32"]),
    ("grid: [3, 1]\n", [], ["grid[0]", "3", "divisor of lattice.shape[0] = 8"]),
    ("grid: [2, 2, 1]\n", [], ["'grid'", "2 integers"]),
    ("grid: [0, 1]\n", [], ["grid[0]", "0", ">= 1"]),
    ("algorithm: heatbath\nlattice: {shape: [8, 7]}\n", [], ["lattice.shape[1]", "7", "even"]),
    ("lattice: {shap: [8, 8]}\n", [], ["unknown key 'lattice.shap'", "did you mean 'lattice.shape'"]),
    ("bet: 2.0\n", [], ["unknown key 'bet'", "did you mean"]),
    ("hmc: {n_steps: 0}\n", [], ["hmc.n_steps", "0", ">= 1"]),
    ("hmc: {integrator: euler}\n", [], ["hmc.integrator", "euler", "omelyan, leapfrog"]),
    ("hmc: 5\n", [], ["'hmc'", "mapping"]),
    ("flow: {kernel_size: 4}\n", [], ["flow.kernel_size", "4", "odd"]),
    ("device: gpu\n", [], ["'device'", "gpu", "cpu, cuda or cuda:N"]),
    ("output: {dir: ''}\n", [], ["output.dir", "non-empty"]),
    ("mixed: {pattern: [flow, metropolis]}\n", [], ["mixed.pattern[1]", "metropolis"]),
    ("run: {progress: maybe}\n", [], ["run.progress", "true or false"]),
    ("algorithm: flow\ngroup: u1\nlattice: {shape: [4, 4, 4, 4]}\n", [], ["lattice.shape", "2D"]),
    ("", ["action.beta"], ["--set 'action.beta'", "KEY=VALUE"]),
    ("", ["action.beta=[1"], ["--set action.beta", "not valid YAML"]),
    ("", ["group.name=x"], ["--set group.name", "not a section"]),
    ("", ["action.beta=0"], ["(with --set)", "action.beta", "> 0"]),
]


@pytest.mark.parametrize("text,overrides,fragments", BAD)
def test_bad_input_one_line_error(tmp_path, text, overrides, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, overrides)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    if not msg.startswith("--set"):
        assert path in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_binary_file(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.lattice == Config().lattice and cfg.seed == Config().seed


def test_apply_overrides_does_not_mutate_input():
    raw = {"action": {"beta": 1.0}}
    new = apply_overrides(raw, ["action.beta=2.0"])
    assert raw["action"]["beta"] == 1.0 and new["action"]["beta"] == 2.0


def test_roundtrip_to_yaml(tmp_path):
    from hpcflow.config import to_yaml

    cfg = load_config(None, ["group=su2", "lattice.shape=[4,4,4,4]", "grid=[1,1,2,2]"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["grid"] == [1, 1, 2, 2]
