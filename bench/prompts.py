"""The benchmark's prompts: a fixed, deterministic list of mixed lengths.

Built from fixed text only (no randomness): short questions, one-paragraph passages (~130 prompt
tokens with the chat template) and three-paragraph passages (~330 tokens), interleaved so that
every prefix of the list mixes the three lengths. Every prompt asks for a long answer, so that
fixed-length outputs (``ignore_eos`` + ``max_tokens``) stay ordinary text.
"""

from __future__ import annotations

QUESTIONS: tuple[str, ...] = (
    "Explain in detail how a rainbow forms after a summer storm.",
    "Describe the history of the city of Rome from its founding to the Renaissance.",
    "Write a long, careful explanation of how vaccines train the immune system.",
    "Explain step by step how a bicycle stays upright while it is moving.",
    "Describe how bread is made, from grinding the wheat to baking the loaf.",
    "Write a detailed essay about why the sky is blue during the day and red at sunset.",
    "Explain how a compiler turns source code into a program that a computer can run.",
    "Describe the life cycle of a star, from a cloud of gas to its final state.",
)

PASSAGES: tuple[str, ...] = (
    "Lighthouses were among the first public works that served every ship alike. The earliest "
    "ones were simple fires kept burning on hilltops near harbours, tended by watchmen who were "
    "paid by the town. Over the centuries the fires moved into stone towers, the wood gave way "
    "to coal and then to oil lamps, and polished metal reflectors gathered the light into a "
    "beam. In the nineteenth century the Fresnel lens, built from rings of glass prisms, made a "
    "small flame visible more than twenty miles out at sea.",
    "The water cycle moves water between the oceans, the air and the land. Sunlight warms the "
    "surface of the sea and water evaporates into the atmosphere, where it cools as it rises "
    "and condenses into the droplets that form clouds. When the droplets grow heavy enough they "
    "fall as rain or snow. Some of that water runs off into rivers and returns to the sea, some "
    "soaks into the ground and feeds springs and wells, and some is taken up by plants and "
    "released again through their leaves.",
    "Before the printing press, every book in Europe was copied by hand, usually in monasteries, "
    "and a single Bible could take a scribe more than a year. Around 1450 Johannes Gutenberg "
    "combined movable metal type, an oil-based ink and a press adapted from those used for wine "
    "and paper. Within fifty years presses were working in more than two hundred cities, "
    "millions of books had been printed, and ideas could spread faster than any authority "
    "could control them.",
    "Honeybees live in colonies of tens of thousands of workers, a few hundred drones and a "
    "single queen. Workers change jobs as they age: young bees clean cells and feed larvae, "
    "middle-aged bees build comb and guard the entrance, and the oldest bees fly out to gather "
    "nectar and pollen. A forager that finds a rich patch of flowers returns to the hive and "
    "performs a waggle dance whose direction and length tell her sisters where the food is.",
    "The first railways carried coal from mines to canals, pulled by horses along wooden rails. "
    "Steam locomotives arrived in the early nineteenth century, and within a few decades iron "
    "lines linked the great cities of Britain, Europe and North America. Railways changed how "
    "people measured time itself: towns that had kept their own local noon adopted a standard "
    "railway time so that timetables could be printed and trains could share a single track "
    "safely.",
    "A glacier forms where more snow falls in winter than melts in summer. Year after year the "
    "snow is buried and pressed into dense ice, and once the ice is thick enough it begins to "
    "flow downhill under its own weight. As it moves, the glacier plucks rocks from its bed and "
    "grinds them against the valley floor, carving the U-shaped valleys, sharp ridges and deep "
    "lakes that remain long after the ice has melted away.",
)

MEDIUM_TASK = "Summarize the passage above and then explain its main idea in detail."
LONG_TASK = (
    "Compare the three passages above. For each one, explain what changed over time and why, "
    "then describe what they have in common."
)


def _medium(i: int) -> str:
    return f"{PASSAGES[i % len(PASSAGES)]}\n\n{MEDIUM_TASK}"


def _long(i: int) -> str:
    parts = [PASSAGES[(i + k) % len(PASSAGES)] for k in range(3)]
    return "\n\n".join(parts) + f"\n\n{LONG_TASK}"


def _base() -> tuple[str, ...]:
    """16 prompts in the order short, medium, short, long, ... (8 short, 4 medium, 4 long)."""
    out: list[str] = []
    for i in range(4):
        out += [QUESTIONS[2 * i], _medium(i), QUESTIONS[2 * i + 1], _long(i)]
    return tuple(out)


BASE: tuple[str, ...] = _base()


def prompts(n: int) -> list[str]:
    """The first ``n`` prompts of the benchmark (the base list, repeated as needed)."""
    return [BASE[i % len(BASE)] for i in range(n)]


def longest(items: list[str] | tuple[str, ...] = BASE) -> str:
    """The longest prompt by characters (the same one is the longest in tokens here)."""
    return max(items, key=len)
