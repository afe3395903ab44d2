"""Speed and memory of a generation run: images/s, seconds per image, NFE, peak memory.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over the run; on the CPU it is the
process's peak resident set size (RSS) sampled every 5 ms during the run by a background thread
(``ru_maxrss`` cannot be reset between runs, so it cannot separate teacher from student).

Times exclude the first pipeline call of a run (its warm-up): :meth:`fastgen.eval.generate.Generated.timed`.
"""

from __future__ import annotations

import threading
import time


class PeakMemory:
    """Context manager: ``with PeakMemory() as mem: ...`` then ``mem.peak_mb`` (and ``mem.kind``)."""

    def __init__(self, device: str = "cpu", interval_s: float = 0.005):
        self.device, self.interval_s = str(device), interval_s
        self.peak_mb = 0.0
        self.kind = "cuda allocated" if self.device.startswith("cuda") else "process RSS"

    def __enter__(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        process = psutil.Process()
        self._stop = threading.Event()
        self.peak_mb = process.memory_info().rss / 2**20

        def watch():
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
        return False


def speed_row(num_images: int, seconds: float, nfe: int, peak_mb: float | None = None,
              baseline_seconds_per_image: float | None = None) -> dict:
    """The speed columns of a result row; ``speedup`` is relative to the baseline's seconds per image."""
    per_image = seconds / num_images
    row = {"images_per_s": num_images / seconds, "s_per_image": per_image, "nfe": nfe}
    if peak_mb is not None:
        row["peak_memory_mb"] = peak_mb
    if baseline_seconds_per_image:
        row["speedup"] = baseline_seconds_per_image / per_image
    return row
