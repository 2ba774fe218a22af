"""Stand-ins shared by the benchmark tests (no model is built, no GPU is needed)."""


class StubModel:
    """What the largest-batch search asks of a model: a backend, train(), to(device)."""

    backend = "auto"

    def train(self):
        pass

    def to(self, device):
        return self
