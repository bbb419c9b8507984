"""``streams``: on CUDA each member's forward, backward and optimizer step on its own stream."""

from __future__ import annotations

import torch

from .sequential import SequentialStrategy


class StreamsStrategy(SequentialStrategy):
    """Each member on its own CUDA stream; on other devices the sequential loop.

    Allocator rules: a tensor made on one stream and used on another is marked with
    ``record_stream`` so its memory is not reused while the other stream may still read
    it (the input batch on every member stream; each member's logits on the main stream).
    """

    name = "streams"

    def __init__(self, models, optimizers, device, compile: bool = False):
        super().__init__(models, optimizers, device, compile)
        self.enabled = self.device.type == "cuda"
        self.streams = [torch.cuda.Stream(self.device) for _ in self.models] if self.enabled else []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(images)
        main = torch.cuda.current_stream(self.device)
        outputs = []
        for forward, stream in zip(self.member_forwards, self.streams):
            stream.wait_stream(main)  # the batch and the previous step's updates are ready
            with torch.cuda.stream(stream):
                images.record_stream(stream)
                outputs.append(forward(images))
        for stream, logits in zip(self.streams, outputs):
            main.wait_stream(stream)  # join before the shared loss
            logits.record_stream(main)
        return torch.stack(outputs)

    def forward_members(self, images: torch.Tensor, members: list[int]) -> torch.Tensor:
        return SequentialStrategy.forward_members(self, images, members)  # on the current stream

    def step(self) -> None:
        if not self.enabled:
            return super().step()
        main = torch.cuda.current_stream(self.device)
        for optimizer, stream in zip(self.optimizers, self.streams):
            # Gradients come from this member's stream (its backward ran there) or from the
            # main stream (autograd joins leaf streams to the caller): wait for both.
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                optimizer.step()
        for stream in self.streams:
            main.wait_stream(stream)  # join before the next step
