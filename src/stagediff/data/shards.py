"""How the cache's sample shards (``cache.sample_shards``) divide the train items."""


def train_share(n_train: int, n_heldout: int, parts: int, part: int) -> slice:
    """Which train items cache job ``part`` of ``parts`` (``cache.sample_shards``) caches: contiguous
    slices in item order, so the parts read in order are the rows one job would write. Every job
    gets about the same number of samples; part 0 also caches the held-out splits, so it takes that
    many fewer train samples."""
    total = n_train + n_heldout
    cut = [0, *(min(n_train, max(0, round(total * k / parts) - n_heldout)) for k in range(1, parts)), n_train]
    return slice(cut[part], cut[part + 1])
