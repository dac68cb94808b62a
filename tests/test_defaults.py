"""The domain-defaults tables: each script's PPO settings differ from ppo_mlp.py's only where this file says so,
and each difference carries its reason in a comment at the line. Trunk settings may differ freely: the sizes
(each script's TRUNK_SIZE_FIELDS), which tests/test_surface.py holds to the MLP's parameter count, and a trunk's
own flags (tests/test_attention.py checks GTrXL's --gate-bias)."""

import dataclasses
import re

from conftest import SCRIPTS, TEMPLATE, load

LUNAR_LANDER_ROW = {
    "total_timesteps": 3_000_000,
    "learning_rate": 3e-4,
    "ent_coef": 0.01,
    "gamma": 0.999,
    "gae_lambda": 0.98,
}
# script -> row -> setting -> the value where it differs from ppo_mlp.py's row (None: ppo_mlp.py's row has no
# such setting). A change to any script's table, ppo_mlp.py's included, must change this list too.
INTENDED_DIFFERENCES = {
    "ppo_mlp.py": {},
    "ppo_lstm.py": {
        "classic": {"learning_rate": 1e-3, "num_minibatches": 1},
        "LunarLanderNoVel-v3": LUNAR_LANDER_ROW,
    },
    "ppo_gru.py": {
        "classic": {"learning_rate": 1e-3, "num_minibatches": 1},
        "LunarLanderNoVel-v3": LUNAR_LANDER_ROW,
    },
    "ppo_trxl.py": {
        "classic": {"total_timesteps": 1_000_000, "learning_rate": 1e-3, "num_minibatches": 1},
        "minigrid": {"total_timesteps": 3_000_000},
    },
    "ppo_gtrxl.py": {
        "classic": {"total_timesteps": 1_000_000, "learning_rate": 1e-3, "num_minibatches": 2},
        "minigrid": {"total_timesteps": 3_000_000},
    },
    "ppo_mamba.py": {
        "classic": {"total_timesteps": 1_000_000, "learning_rate": 1e-3, "num_minibatches": 1},
        "minigrid": {"total_timesteps": 3_000_000},
        "LunarLanderNoVel-v3": LUNAR_LANDER_ROW,
    },
    "ppo_mamba2.py": {
        "classic": {"total_timesteps": 1_000_000, "learning_rate": 1e-3, "num_minibatches": 1},
        "minigrid": {"total_timesteps": 3_000_000},
        "LunarLanderNoVel-v3": LUNAR_LANDER_ROW,
        "MiniGrid-MemoryS11-v0": {"trunk_learning_rate": 1e-4, "num_steps": 256},
    },
}


def trunk_settings(module, reference) -> set[str]:
    """A trunk's sizes and its own flags (--gate-bias), which the reference does not have: not PPO settings."""
    own = {field.name for field in dataclasses.fields(module.Args)}
    own -= {field.name for field in dataclasses.fields(reference.Args)}
    return own | set(module.TRUNK_SIZE_FIELDS)


def ppo_differences(module, reference) -> dict[str, dict]:
    """Row -> setting -> value, for every PPO setting (not a trunk setting) where the table differs from the
    reference's."""
    differences = {}
    for row in module.DOMAIN_DEFAULTS.keys() | reference.DOMAIN_DEFAULTS.keys():
        ours, theirs = module.DOMAIN_DEFAULTS.get(row, {}), reference.DOMAIN_DEFAULTS.get(row, {})
        for name in (ours.keys() | theirs.keys()) - trunk_settings(module, reference):
            if ours.get(name) != theirs.get(name):
                differences.setdefault(row, {})[name] = ours.get(name)
    return differences


def test_ppo_settings_differ_from_the_template_only_as_listed():
    assert {script.name for script in SCRIPTS} == set(INTENDED_DIFFERENCES)
    reference = load(TEMPLATE)
    for script in SCRIPTS:
        assert ppo_differences(load(script), reference) == INTENDED_DIFFERENCES[script.name], script.name


def test_the_template_table_has_every_domain_and_ppo_setting():
    table = load(TEMPLATE).DOMAIN_DEFAULTS
    ppo_settings = {"total_timesteps", "learning_rate", "num_envs", "num_steps", "num_minibatches"}
    ppo_settings |= {"update_epochs", "clip_coef", "ent_coef", "gamma", "gae_lambda"}
    for domain in ("mujoco", "atari", "classic", "minigrid"):
        assert table[domain].keys() >= ppo_settings, domain


def table_lines(script) -> dict[tuple[str, str], str]:
    """(row, setting) -> the source line of that setting in the script's DOMAIN_DEFAULTS, with the comment
    lines just above the row (a row's reason may be said once, above it) and those just above the setting
    inside the row (which belong to that setting alone, not to the next row)."""
    text = script.read_text()
    table = text[text.index("DOMAIN_DEFAULTS = {") : text.index("\n}\n", text.index("DOMAIN_DEFAULTS = {"))]
    lines, row, row_comments, above = {}, None, [], []
    for line in table.splitlines()[1:]:
        if line.strip().startswith("#"):
            above.append(line)
            continue
        header = re.match(r'    "([^"]+)": dict\((.*)', line)
        setting = re.match(r"        (\w+)=", line)
        if header:
            row, row_comments = header.group(1), [*above, line]
            for name in re.findall(r"(\w+)=", header.group(2)):  # a row written on one line
                lines[row, name] = "\n".join(row_comments)
        elif setting:
            lines[row, setting.group(1)] = "\n".join([*row_comments, *above, line])
        above = []  # a comment speaks for the line below it only
    return lines


def test_every_intended_difference_says_why_at_its_line():
    for script in SCRIPTS:
        lines = table_lines(script)
        for row, settings in INTENDED_DIFFERENCES[script.name].items():
            for name in settings:
                source = lines[row, name]
                assert "#" in source, f"{script.name}: {row} {name} differs from ppo_mlp.py without a reason"


def test_the_memory_s11_row_refines_minigrid_for_that_env_only(template):
    memory = template.parse_args(["--env-id", "MiniGrid-MemoryS11-v0", "--minigrid-obs", "symbolic"])
    assert (memory.update_epochs, memory.num_minibatches, memory.ent_coef) == (8, 8, 0.03)
    doorkey = template.parse_args(["--env-id", "MiniGrid-DoorKey-8x8-v0", "--minigrid-obs", "symbolic"])
    row = template.DOMAIN_DEFAULTS["minigrid"]
    assert (doorkey.update_epochs, doorkey.num_minibatches, doorkey.ent_coef) == (
        row["update_epochs"],
        row["num_minibatches"],
        row["ent_coef"],
    )
    passed = template.parse_args(["--env-id", "MiniGrid-MemoryS11-v0", "--ent-coef", "0.01"])
    assert passed.ent_coef == 0.01  # a flag the user passes still wins
