"""The scripts copy each other on purpose; the copies must stay honest (DESIGN sections 2, 3 and 10).

A shared section starts with a line `# >>> shared: <name>` and ends with `# <<< shared: <name>`. Every script
has the same sections, in the same order, and each section is byte-identical across scripts.
"""

import re

from conftest import SCRIPTS, TEMPLATE

MARKER = re.compile(r"^ *# (>>>|<<<) shared: (\S+)$", re.MULTILINE)
SECTION_HEADINGS = ["# 3. Arguments", "# 4. Domain defaults", "# 5. Environments", "# 6. Network", "# 7. Profiling"]
SECTION_HEADINGS += ["# 8. Training"]
REQUIRED = {"imports", "args", "parse_args", "environments", "encoders", "agent", "profiling", "main"}


def shared_sections(text: str) -> dict[str, str]:
    """Name -> text between its markers; raises on unbalanced or nested markers."""
    sections, open_name, open_end = {}, None, 0
    for match in MARKER.finditer(text):
        kind, name = match.groups()
        if kind == ">>>":
            assert open_name is None, f"section {name!r} opens inside {open_name!r}"
            assert name not in sections, f"section {name!r} appears twice"
            open_name, open_end = name, match.end()
        else:
            assert name == open_name, f"section {name!r} closes but {open_name!r} is open"
            sections[name] = text[open_end : match.start()]
            open_name = None
    assert open_name is None, f"section {open_name!r} never closes"
    return sections


def test_marker_parser_catches_mistakes():
    good = "# >>> shared: a\nx = 1\n# <<< shared: a\n"
    assert shared_sections(good) == {"a": "\nx = 1\n"}
    for bad in ("# >>> shared: a\n", "# >>> shared: a\n# <<< shared: b\n", good + good):
        try:
            shared_sections(bad)
        except AssertionError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_template_has_every_shared_section():
    assert set(shared_sections(TEMPLATE.read_text())) >= REQUIRED


def test_shared_sections_are_identical_across_scripts():
    reference = shared_sections(TEMPLATE.read_text())
    for script in SCRIPTS:
        sections = shared_sections(script.read_text())
        assert list(sections) == list(reference), f"{script.name} has sections {list(sections)}"
        for name, text in reference.items():
            assert sections[name] == text, f"{script.name}: section {name!r} differs from {TEMPLATE.name}"


def test_sections_come_in_the_design_order():
    for script in SCRIPTS:
        text = script.read_text()
        assert text.startswith('"""'), f"{script.name} must open with its docstring"
        positions = [text.index(heading) for heading in SECTION_HEADINGS]
        assert positions == sorted(positions), f"{script.name}: sections out of order"
        assert text.index("import torch") < positions[0]


def test_scripts_do_not_import_each_other():
    for script in SCRIPTS:
        assert not re.search(r"^\s*(from|import) ppo_", script.read_text(), re.MULTILINE), script.name
