"""fastdiff.results_tables against hand-written markdown (what a reader of the results files sees)."""
import pytest

from fastdiff.results_tables import header_lines, nfe_table, pipe_table, write


def test_a_document_reads_as_written_by_hand(tmp_path):
    lines = [*header_lines("Solver error", {"model": "digits", "samples": 8}, ["rmse: in data units"]), ""]
    lines += pipe_table(["solver", "rmse", "seconds"], [["ddim", "0.031", "1.5"], ["unipc", "0.004", ""]], align="lrr")
    lines += ["", *nfe_table(["solver", "grid"], [("ddim", "trailing"), ("heun", "karras")], [10, 20],
                             {("ddim", "trailing", 10): "0.03", ("heun", "karras", 20): "0.01",
                              ("heun", "trailing", 10): "not a row"})]
    path = tmp_path / "made" / "here" / "table.md"
    write(path, lines)
    assert path.read_text() == """# Solver error

- model: digits
- samples: 8
- rmse: in data units

| solver | rmse | seconds |
|---|---:|---:|
| ddim | 0.031 | 1.5 |
| unipc | 0.004 |  |

| solver | grid | NFE 10 | NFE 20 |
|---|---|---:|---:|
| ddim | trailing | 0.03 |  |
| heun | karras |  | 0.01 |
"""


def test_every_column_is_left_aligned_by_default():
    assert pipe_table(["a", "b"], []) == ["| a | b |", "|---|---|"]


@pytest.mark.parametrize("align", ["l", "lrr", "lc"])
def test_an_align_letter_per_column_is_required(align):
    with pytest.raises(ValueError, match="align"):
        pipe_table(["a", "b"], [], align=align)


def test_a_row_must_fill_every_column():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        pipe_table(["a", "b", "c"], [["1", "2", "3"], ["1", "2"]])
