"""Alerts a run sent to W&B, read back from its offline transaction log."""

import glob
import os
import struct


def _wandb_records(path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_alerts(workdir) -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(glob.glob(os.path.join(str(workdir), "wandb", "offline-run-*", "*.wandb"))):
        found += [(r.alert.title, r.alert.text, r.alert.level) for r in _wandb_records(path)
                  if r.WhichOneof("record_type") == "alert"]
    return found
