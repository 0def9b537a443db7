"""py.wordcount(text, top=3): how many words, and the most frequent ones."""
import heapq  # noqa: F401 -- Counter.most_common imports it lazily; a component bundles only what is imported at build time
from collections import Counter

from taskhost import task


@task
def wordcount(text, top=3):
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    counts = Counter(w for w in words if w)
    return {"words": sum(counts.values()), "top": [[w, n] for w, n in counts.most_common(top)]}
