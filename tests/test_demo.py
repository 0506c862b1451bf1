"""The README's main job runs and every optimizer in it learns."""

from dist_optim import demo


def test_demo_prints_a_row_per_optimizer_and_every_loss_falls(capsys):
    demo.main(["--steps", "60"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "optimizer" not in line]
    assert [r.split("|")[1].strip() for r in rows] == list(demo.OPTIMIZERS)
    for row in rows:
        first, last = (float(c) for c in row.split("|")[2:4])
        assert last < first, row
