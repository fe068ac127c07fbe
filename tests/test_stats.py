"""Statistics shared by worker processes through files: sums over workers, long names, torn-free reads."""

from __future__ import annotations

from pathlib import Path

from dhow.scheduling.stats import BatchTimings, ModelStats, StatsFolder


def _stats(root: Path, worker: int, name: str) -> ModelStats:
    return ModelStats(8, shared=(StatsFolder(root, worker), name, 3))


def test_two_workers_are_summed_and_a_successor_counts_on(tmp_path: Path) -> None:
    first, second = _stats(tmp_path, 1, "fraud"), _stats(tmp_path, 2, "fraud")
    first.record_request(True, 1_000, rows=2)
    second.record_request(True, 3_000, rows=1)
    second.record_batch(BatchTimings(size=4, input_ns=10, infer_ns=20, output_ns=30), requests=2)
    successor = _stats(tmp_path, 1, "fraud")  # worker 1 restarted: its file is opened again
    successor.record_request(False, 500, rows=1)
    for reader in (first, second, successor):
        stats = reader.as_dict("fraud", "3")
        assert stats["inference_count"] == 3
        assert stats["execution_count"] == 1
        assert stats["inference_stats"]["success"] == {"count": 2, "ns": 4_000}
        assert stats["inference_stats"]["fail"] == {"count": 1, "ns": 500}
        assert [row["batch_size"] for row in stats["batch_stats"]] == [4]


def test_a_long_non_ascii_name_gets_a_folder_that_fits(tmp_path: Path) -> None:
    long_name, other = "模型" * 60, "模型" * 60 + "x"
    stats, neighbour = _stats(tmp_path, 1, long_name), _stats(tmp_path, 1, other)
    stats.record_request(True, 10, rows=1)
    assert all(len(path.name.encode()) < 255 for path in tmp_path.iterdir())
    assert stats.as_dict(long_name, "3")["inference_count"] == 1
    assert neighbour.as_dict(other, "3")["inference_count"] == 0  # the hash keeps the two apart
