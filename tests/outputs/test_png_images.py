"""lora_monitor.outputs.writers' PNG path: the image TensorBoard shows is the array the monitor
drew, pixel for pixel, read back from a real event file; an image drawn before is not encoded
again, and two images never share an encoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lora_monitor.outputs.writers import SummaryWriterOutput, add_png_image, png_bytes


def _pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def test_summary_writer_images_read_back_pixel_for_pixel(tmp_path):
    first, second = _image(0), _image(1)
    output = SummaryWriterOutput(log_dir=tmp_path)
    output.image("lora_monitor/card", first, step=3)
    output.image("lora_monitor/card", second, step=6)
    output.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    read = events.Images("lora_monitor/card")
    assert [(image.step, image.height, image.width) for image in read] == [(3, 37, 53), (6, 37, 53)]
    np.testing.assert_array_equal(_pixels(read[0].encoded_image_string), first)
    np.testing.assert_array_equal(_pixels(read[1].encoded_image_string), second)


def test_an_image_is_encoded_once_and_never_mistaken_for_another():
    image = _image(2)
    assert png_bytes(image.copy()) is png_bytes(image.copy())  # the cached encoding, not a new one
    changed = image.copy()
    changed[-1, -1, -1] ^= 1  # one bit of one pixel
    assert png_bytes(changed) != png_bytes(image)
    np.testing.assert_array_equal(_pixels(png_bytes(changed)), changed)
    # Same bytes, another shape: another image.
    reshaped = np.ascontiguousarray(image.reshape(53, 37, 3))
    np.testing.assert_array_equal(_pixels(png_bytes(reshaped)), reshaped)


def test_matches_what_add_image_writes(tmp_path):
    image = _image(3)
    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_image("theirs", image, global_step=1, dataformats="HWC")
    add_png_image(writer, "ours", image, step=1)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    (theirs,), (ours,) = events.Images("theirs"), events.Images("ours")
    assert (ours.height, ours.width, ours.step) == (theirs.height, theirs.width, theirs.step)
    np.testing.assert_array_equal(_pixels(ours.encoded_image_string), _pixels(theirs.encoded_image_string))


def test_a_writer_without_a_file_writer_gets_add_image():
    calls = []

    class PlainWriter:  # e.g. a logging shim that only knows the public add_image
        def add_image(self, tag, image, global_step, dataformats):
            calls.append((tag, image.shape, global_step, dataformats))

    add_png_image(PlainWriter(), "t", _image(4), step=5)
    assert calls == [("t", (37, 53, 3), 5, "HWC")]
