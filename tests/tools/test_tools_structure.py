"""tools/cli.py: library parameter names become the tools' flags; the tools share code only through tools/cli.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from diffusion.command import FLAGS, flag_names, run_cli
from diffusion.sampling.conditions import IndexSource, RegionSource
from tests.helpers.paths import REPO
from tests.helpers.source import parse_file


# The demo's own helper modules (report, stand-in training, the slide download) are parts of the one demo tool.
def test_flag_names_maps_parameters_to_flags():
    assert flag_names("`n_images` 0: expected >= 1") == "--n-images 0: expected >= 1"
    assert flag_names("`features` packed needs `index_file`") == "--features packed needs --index"
    assert flag_names("`not_a_parameter` stays") == "`not_a_parameter` stays"  # library users read the name
    assert all(flag.startswith("--") for flag in FLAGS.values())


def test_library_errors_name_parameters_and_tools_print_flags(tmp_path, capsys):
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError) as err:
        IndexSource(1, 256, patches=["a.png"], data_root=tmp_path / "root", n_images=0)
    assert str(err.value) == "`n_images` 0: expected >= 1"
    with pytest.raises(ValueError, match="use `images`, `grids` or `dataset_regions`"):
        RegionSource(4, 256, 8)

    def tool(argv):
        RegionSource(4, 256, 8)

    assert run_cli(tool, []) == 2
    assert capsys.readouterr().err.strip() == "error: no regions given (use --image, --grid or --region)"


def test_library_sampling_messages_name_no_flags():
    for path in (REPO / "diffusion" / "sampling").glob("*.py"):
        for node in ast.walk(parse_file(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert " --" not in node.value and not node.value.startswith("--"), (
                    f"{path.name}: {node.value!r}"
                )


def imported_tools(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(parse_file(path)):
        if isinstance(node, ast.ImportFrom) and node.module == "tools":
            out |= {f"tools.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tools.")}
    return out


def test_tools_import_no_other_tool_but_cli(tmp_path):
    for path in sorted((REPO / "tools").glob("*.py")):
        assert imported_tools(path) <= {"tools.cli"}, (
            f"{path.name} imports {sorted(imported_tools(path) - {'tools.cli'})}"
        )
    # the check sees imports inside functions too
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tools.sample import main\n    import tools.evaluate\n")
    assert imported_tools(probe) == {"tools.sample", "tools.evaluate"}
