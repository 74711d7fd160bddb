"""`icae ablate`: what each grid runs (the seed's decoder in the seed grid), without training."""

import pytest

from icae.recipes.ablate import grid_runs, main
from icae.errors import UserError


def test_seed_grid_is_the_seeds_four_runs_with_its_decoder():
    runs = grid_runs("seed", [1])
    assert [name for name, _ in runs] == ["default-qv-seed1", "default-all-linear-seed1",
                                          "epl-qv-seed1", "epl-all-linear-seed1"]
    assert all(point["decoder_mode"] == "shared" for _, point in runs)


def test_full_grid_keeps_frozen_and_shared():
    modes = [point["decoder_mode"] for _, point in grid_runs("full", [1, 2])]
    assert modes.count("frozen") == modes.count("shared") == 8


def test_dry_run_shows_the_shared_decoder(tmp_path, capsys):
    assert main(["--grid", "seed", "--output_dir", str(tmp_path), "--dry_run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("--decoder_mode=shared" in line for line in lines)
    assert sum("--position_layout=epl" in line for line in lines) == 2


@pytest.mark.parametrize("flag", ["--decoder_mode=frozen", "--train_decoder=False", "--position_layout=epl"])
def test_seed_grid_refuses_flags_it_sets(tmp_path, flag):
    with pytest.raises(UserError, match="set by"):
        main(["--grid", "seed", "--output_dir", str(tmp_path), "--dry_run", flag])
