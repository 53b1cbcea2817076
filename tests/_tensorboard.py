"""What TensorBoard shows from a workdir's event files, read with tensorboardX's protos, shared by tests."""

import pathlib


def tensorboard_scalars(workdir, tag):
  """(step, value) pairs TensorBoard shows for `tag`: event files in order, and a session START at
  step p (tensorboardX's purge_step) drops the earlier files' events at steps >= p, as TensorBoard does."""
  import struct
  from tensorboardX.proto import event_pb2
  points = []  # a list: a step written twice without a purge shows twice
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):  # TFRecord: uint64 length, crc, payload, crc
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 16 + n
      if event.session_log.status == event_pb2.SessionLog.START:
        points = [(s, v) for s, v in points if s < event.step]
      for value in event.summary.value:
        if value.tag == tag:
          points.append((event.step, value.simple_value))
  return sorted(points)
