"""A small reader of TensorBoard event files (TFRecord framing + the Event protobuf that
tensorboardX ships), to check what a run wrote."""

import struct
from collections import defaultdict


def scalars(path) -> dict[str, dict[int, float]]:
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = defaultdict(dict)
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset: offset + 8])
        record = data[offset + 12: offset + 12 + length]  # skip the length's CRC
        offset += 12 + length + 4  # and the record's
        event = Event.FromString(record)
        for value in event.summary.value:
            out[value.tag][event.step] = value.simple_value
    return out
