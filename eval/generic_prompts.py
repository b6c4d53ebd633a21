"""General-purpose instructions unrelated to the task, for the self-distilled generic-Medusa baseline.

Prompts are templates (grouped by kind: explain, summarise, poem, email, ...) filled from topic pools, plus
arithmetic word problems with drawn numbers, all chosen by a seeded ``random.Random`` so the list is a pure
function of the seed.
"""

from __future__ import annotations

import random
from string import Formatter

CONCEPTS = (
    "photosynthesis",
    "compound interest",
    "recursion",
    "black holes",
    "inflation",
    "the water cycle",
    "supply and demand",
    "vaccines",
    "plate tectonics",
    "machine learning",
    "the greenhouse effect",
    "DNA replication",
    "blockchains",
    "gravity",
    "the immune system",
    "electric circuits",
    "democracy",
    "the stock market",
    "evolution by natural selection",
    "encryption",
    "the speed of light",
    "rainbows",
    "ocean tides",
    "the placebo effect",
    "opportunity cost",
    "a hash table",
    "the Pythagorean theorem",
    "volcanoes",
    "caffeine's effect on the body",
    "how airplanes fly",
    "the moon's phases",
    "recycling",
)
COMPARISONS = (
    "weather and climate",
    "a virus and a bacterium",
    "speed and velocity",
    "a loan and a grant",
    "RAM and storage",
    "a simile and a metaphor",
    "an alligator and a crocodile",
    "stocks and bonds",
    "a comet and an asteroid",
    "baking soda and baking powder",
    "a lake and a pond",
    "TCP and UDP",
    "mitosis and meiosis",
    "a hurricane and a tornado",
    "an essay and a report",
    "jam and jelly",
)
PARAGRAPHS = (
    (
        "The city council met on Tuesday to discuss the new bike lanes. Supporters said the lanes would make "
        "cycling safer and reduce traffic, while some shop owners worried about losing parking spaces. The "
        "council agreed to run a six-month trial on two streets before making a final decision."
    ),
    (
        "Honeybees communicate the location of food through a movement called the waggle dance. The angle of "
        "the dance shows the direction of the flowers relative to the sun, and its length indicates the "
        "distance. Other bees watch the dance and then fly straight to the source."
    ),
    (
        "Our team moved the weekly planning meeting from Monday to Wednesday. Many people were busy catching "
        "up after the weekend, so Monday meetings often started late. Since the change, attendance has "
        "improved and the meetings finish on time."
    ),
    (
        "The first public library in the town opened in 1902 with only three hundred books. Over the next "
        "century it grew into a large building with a children's wing, a computer room and a small cafe. "
        "Today it lends more than fifty thousand items every year."
    ),
    (
        "Sleep plays an important role in memory. During deep sleep, the brain replays what was learned "
        "during the day and strengthens the connections between neurons. Students who sleep well after "
        "studying usually remember more than those who stay up late."
    ),
    (
        "The restaurant changed its menu this spring to focus on local vegetables. The chef visits the "
        "farmers' market every morning and plans the daily specials around what is fresh. Customers have "
        "praised the new dishes, although a few miss the old burgers."
    ),
    (
        "Electric cars are becoming more common as battery prices fall. They are cheaper to run than petrol "
        "cars and produce no exhaust, but they take longer to refuel and charging stations are still rare in "
        "some areas. Governments are investing in new chargers to close the gap."
    ),
    (
        "The museum's new exhibition shows tools used by sailors in the eighteenth century. Visitors can try "
        "a replica compass, read old ship logs and see how sailors used the stars to find their way. The "
        "exhibition runs until the end of the year."
    ),
    (
        "A small software company switched to a four-day work week last year. Managers expected output to "
        "drop, but the number of finished projects stayed the same and fewer people took sick days. The "
        "company now plans to make the change permanent."
    ),
    (
        "Mangrove forests grow along tropical coastlines where fresh water meets the sea. Their tangled roots"
        " slow down waves, protect the shore from storms and give shelter to young fish. Many mangroves have "
        "been cut down, and several countries are now replanting them."
    ),
)
POEM_SUBJECTS = (
    "the ocean at night",
    "a rainy Monday",
    "autumn leaves",
    "a cup of coffee",
    "an old library",
    "the first snow",
    "a lighthouse",
    "a city at dawn",
    "a lost key",
    "a sleeping cat",
    "the desert",
    "a train journey",
    "a garden in spring",
    "the moon",
    "a thunderstorm",
    "friendship",
    "a mountain lake",
    "a forgotten letter",
)
POEM_FORMS = ("a short poem", "a haiku", "a limerick", "a four-line rhyming poem", "a free-verse poem")
EMAIL_TASKS = (
    "to a colleague asking to move tomorrow's meeting to the afternoon",
    "to a landlord reporting a leaking kitchen tap",
    "to a teacher explaining that your child will miss school on Friday",
    "to a customer apologising for a delayed delivery",
    "to your team announcing a new weekly stand-up",
    "to a friend thanking them for a birthday present",
    "to a hotel asking whether early check-in is possible",
    "to a manager requesting two days of leave next month",
    "to a neighbour inviting them to a garden party",
    "to a library asking to renew a borrowed book",
    "to a client sending the final version of a report",
    "to a gym cancelling your membership",
)
STORY_CHARACTERS = (
    "a shy robot",
    "an old fisherman",
    "a curious child",
    "a retired astronaut",
    "a talking parrot",
    "a nervous chef",
    "a young inventor",
    "a lonely lighthouse keeper",
    "a clumsy wizard",
    "a street musician",
)
STORY_EVENTS = (
    "finds a mysterious map",
    "loses their voice before a big day",
    "meets a stranger on a train",
    "discovers a door that was not there yesterday",
    "has to cross a frozen river",
    "wins an unexpected prize",
    "wakes up a hundred years in the future",
    "tries to bake a cake for the first time",
)
TRIVIA = (
    "What is the capital of Australia?",
    "How many planets are in the solar system?",
    "Who wrote 'Pride and Prejudice'?",
    "What is the largest ocean on Earth?",
    "What gas do plants absorb from the air?",
    "How many sides does a hexagon have?",
    "What is the boiling point of water at sea level in Celsius?",
    "Which planet is known as the Red Planet?",
    "Who painted the Mona Lisa?",
    "What is the hardest natural substance?",
    "What is the longest river in Africa?",
    "In which year did the first person walk on the Moon?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the smallest prime number?",
    "Which language has the most native speakers?",
    "What is the tallest mountain in the world?",
    "Who developed the theory of relativity?",
    "What is the freezing point of water in Fahrenheit?",
    "How many bones are in the adult human body?",
    "Which animal is the largest mammal?",
    "What is the main ingredient in guacamole?",
    "What currency is used in Japan?",
    "How many minutes are in a day?",
)
TIP_TOPICS = (
    "sleeping better",
    "learning a new language",
    "saving money on groceries",
    "staying focused while working from home",
    "running your first 5k",
    "keeping houseplants alive",
    "writing a good CV",
    "public speaking",
    "reducing screen time",
    "cooking for one person",
    "preparing for a job interview",
    "travelling on a budget",
    "studying for exams",
    "starting a vegetable garden",
    "making new friends in a new city",
    "drinking more water",
    "organising a small kitchen",
    "taking better photos with a phone",
    "managing stress",
    "reading more books",
)
SENTENCES = (
    "The meeting was cancelled because nobody had read the report.",
    "We need the numbers by Friday or the project will be late.",
    "I think the new design looks kind of confusing.",
    "The train was late again so I missed the start of the film.",
    "Your order has been shipped and should arrive soon.",
    "The software crashed when I tried to save my work.",
    "Thanks for helping me move house last weekend.",
    "The park near my house is really nice in the summer.",
    "Prices went up a lot this year and people are not happy.",
    "Please remember to turn off the lights when you leave.",
)
STYLES = (
    "more formal",
    "more friendly",
    "shorter",
    "more polite",
    "more enthusiastic",
    "simpler for a child",
)
TRANSLATIONS = ("French", "Spanish", "German", "Italian")

_NAMES = ("Maya", "Tom", "Priya", "Leo", "Sara", "Jonas", "Aiko", "Omar", "Lena", "Ben")


def _math_problem(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    a, b, c = rng.randint(10, 40), rng.randint(2, 12), rng.randint(2, 9)
    return rng.choice(
        (
            (
                f"{name} buys {a} apples and gives away {c}. Each remaining apple costs ${b}. "
                "How much did the remaining apples cost in total?"
            ),
            f"A train travels at {a * 5} km/h for {b} hours. How far does it go?",
            f"{name} reads {a} pages a day. How many pages will {name} have read after {b} days?",
            f"A box holds {b} pencils. How many boxes are needed for {a * c} pencils?",
            f"{name} has ${a * 10} and spends ${b * 3} on lunch and ${c * 4} on a book. How much money is left?",
            f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * c} people?",
            f"A rectangle is {a} cm long and {b} cm wide. What is its area and its perimeter?",
            f"{name} saves ${b} every week. How many weeks does it take to save ${b * a}?",
        )
    )


# Instruction templates by kind; each {field} is drawn from POOLS, {problem} from _math_problem.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "explain": (
        "Explain {concept} in simple terms.",
        "What is {concept}? Answer in two or three sentences.",
        "Give a beginner-friendly explanation of {concept}.",
        "Explain {concept} to a ten-year-old.",
    ),
    "compare": ("What is the difference between {pair}?", "Compare {pair} in a few sentences."),
    "summarise": (
        "Summarise the following paragraph in one sentence:\n\n{paragraph}",
        "Give the main point of this text in a few words:\n\n{paragraph}",
        "Write a short title and a one-sentence summary for this paragraph:\n\n{paragraph}",
    ),
    "poem": ("Write {form} about {subject}.",),
    "email": ("Write a short email {email}.", "Draft a polite email {email}."),
    "story": ("Write a {length} story about {character} who {event}.",),
    "trivia": ("{trivia}", "Quick question: {trivia}", "Answer briefly: {trivia}"),
    "tips": ("Give me {count} tips for {tips}.", "What are {count} practical tips for {tips}?"),
    "rewrite": ('Rewrite this sentence to sound {style}: "{sentence}"',),
    "translate": ('Translate into {language}: "{sentence}"',),
    "math": ("Solve this word problem: {problem}", "{problem} Show your working."),
}
POOLS: dict[str, tuple[str, ...]] = {
    "concept": CONCEPTS,
    "pair": COMPARISONS,
    "paragraph": PARAGRAPHS,
    "form": POEM_FORMS,
    "subject": POEM_SUBJECTS,
    "email": EMAIL_TASKS,
    "length": ("three-sentence", "short", "very short"),
    "character": STORY_CHARACTERS,
    "event": STORY_EVENTS,
    "trivia": TRIVIA,
    "count": ("3", "5", "7"),
    "tips": TIP_TOPICS,
    "style": STYLES,
    "sentence": SENTENCES,
    "language": TRANSLATIONS,
}


def _fill(template: str, rng: random.Random) -> str:
    fields = sorted({name for _, name, _, _ in Formatter().parse(template) if name})
    values = {f: _math_problem(rng) if f == "problem" else rng.choice(POOLS[f]) for f in fields}
    return template.format(**values)


def make_generic_prompts(seed: int = 0, n: int = 300) -> list[str]:
    """``n`` distinct general instructions (none about the query task), deterministic from ``seed``."""
    rng = random.Random(seed)
    kinds = sorted(TEMPLATES)
    prompts: dict[str, None] = {}
    for _ in range(n * 50):
        if len(prompts) >= n:
            break
        prompts.setdefault(_fill(rng.choice(TEMPLATES[rng.choice(kinds)]), rng))
    if len(prompts) < n:
        raise ValueError(f"could not draw {n} distinct generic prompts")
    return list(prompts)
