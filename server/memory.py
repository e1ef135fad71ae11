"""GET /sdapi/v1/memory: this process's RAM and the CUDA allocator's figures, in A1111's shape."""
from __future__ import annotations

import os


def memory_json() -> dict:
    import torch

    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page  # this process's resident memory, as A1111 reports it
        ram = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, AttributeError) as e:
        ram = {"error": str(e)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()
    cuda = {"system": {"free": free, "used": total - free, "total": total}}
    for name, key in [("active", "active_bytes"), ("allocated", "allocated_bytes"),
                      ("reserved", "reserved_bytes"), ("inactive", "inactive_split_bytes")]:
        cuda[name] = {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}
    cuda["events"] = {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}
    return {"ram": ram, "cuda": cuda}
