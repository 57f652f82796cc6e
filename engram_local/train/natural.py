"""Synthetic people for the skill adapter's `echo` samples: first-person statements as people
type them about themselves, made from general word lists (no evaluation data).

Each statement is split by the fact rule (`text.facts.split_statement`) and asked about with
`text.questions.question_forms` - the writer fits rows in the very same (question, reply
prefix) forms, so the adapter learns the replies the rows are keyed on. The reply's value is
masked out of the loss (`train.skill`): the user's rows supply it at run time.
"""

from __future__ import annotations

import random

FIRST = ("Olivia", "Liam", "Noah", "Amara", "Kenji", "Sofia", "Mateo", "Zara", "Ethan", "Leila", "Tomas",
         "Ingrid", "Ravi", "Chloe", "Yusuf", "Hana", "Marco", "Nadia", "Felix", "Aiko", "Omar", "Greta",
         "Diego", "Maya", "Lucas", "Freya", "Arjun", "Elena", "Jonas", "Mei", "Kwame", "Isla", "Pavel",
         "Rosa", "Samir", "Clara", "Tariq", "Lena", "Hugo", "Nia", "Viktor", "Ayla", "Bruno", "Saoirse")
LAST = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Haddad", "Kowalski", "Byrne",
        "Fischer", "Mensah", "Rossi", "Petrov", "Nakamura", "Silva", "Dubois", "Kaur", "O'Neill",
        "Jansen", "Costa", "Yilmaz", "Sato", "Baker", "Schmidt", "Murphy", "Ali", "Berg", "Lopez")
CITIES = ("Leeds", "Porto", "Osaka", "Denver", "Krakow", "Nairobi", "Valencia", "Halifax", "Perth",
          "Bergen", "Ghent", "Tucson", "Quebec City", "Cork", "Bologna", "Adelaide", "Seville",
          "Minneapolis", "Gdansk", "Wellington", "San Diego", "Lausanne", "Brno", "Kyoto", "Galway")
JOBS = ("nurse", "plumber", "software developer", "history teacher", "pharmacist", "carpenter",
        "data analyst", "paramedic", "civil engineer", "librarian", "chef", "dental hygienist",
        "translator", "photographer", "bank clerk", "veterinarian", "social worker", "pilot",
        "journalist", "landscape architect", "physiotherapist", "accountant", "barista", "welder")
COMPANIES = ("Northwind Logistics", "Bluebird Bakery", "Harbor Health", "Pinecrest Labs", "Redwood Books",
             "Silverline Transit", "Copperleaf Studio", "Maple Grove Clinic", "Ironbridge Bank",
             "Sunfield Farms", "Brightwave Media", "Stonegate School")
PETS = ("dog", "cat", "parrot", "rabbit", "hamster", "labrador", "beagle", "tabby cat", "border collie",
        "goldfish", "tortoise", "pony", "cockatiel", "poodle")
PET_NAMES = ("Pepper", "Milo", "Luna", "Rufus", "Mochi", "Ziggy", "Olive", "Bandit", "Clover", "Nugget",
             "Pickles", "Juniper", "Waffles", "Scout", "Maple", "Tofu", "Pumpkin", "Ollie")
RELATIVES = ("wife", "husband", "partner", "son", "daughter", "brother", "sister", "mother", "father",
             "best friend", "grandmother", "cousin", "niece", "nephew", "roommate", "fiancee")
ROLES = ("manager", "dentist", "doctor", "landlord", "boss", "therapist", "accountant", "neighbor",
         "personal trainer", "piano teacher", "lawyer", "mentor", "coworker", "hairdresser")
CARS = ("red Mazda 3", "silver Honda Civic", "black Volvo XC60", "white Ford Transit", "green Mini Cooper",
        "grey Skoda Octavia", "blue Kia Niro", "Tesla Model 3", "yellow Fiat 500", "Toyota Corolla")
ALLERGENS = ("peanuts", "shellfish", "latex", "bee stings", "aspirin", "cats", "pollen", "sesame",
             "ibuprofen", "gluten", "strawberries", "dust mites", "sulfa drugs", "eggs")
FOODS = ("lasagna", "pad thai", "sushi", "mushroom risotto", "tacos", "pho", "falafel", "dumplings",
         "paella", "ramen", "goulash", "curry")
HOBBIES = ("rock climbing", "knitting", "birdwatching", "chess", "pottery", "salsa dancing", "gardening",
           "trail running", "woodworking", "photography", "kayaking", "baking sourdough")
TEAMS = ("Boston Celtics", "Ajax", "Chicago Cubs", "Leinster", "Celtic", "Green Bay Packers", "Benfica",
         "Melbourne Storm", "Toronto Raptors", "Borussia Dortmund")
COLORS = ("teal", "mustard yellow", "navy blue", "forest green", "burgundy", "lavender", "orange")
LANGS = ("Portuguese", "Swahili", "Korean", "Polish", "Arabic", "Dutch", "Hindi", "Greek", "Turkish")
INSTRUMENTS = ("cello", "ukulele", "drums", "violin", "piano", "saxophone", "banjo", "flute")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
DRINKS = ("green tea", "flat white", "hot chocolate", "chai latte", "espresso", "oolong tea")
SCHOOLS = ("Riverside Primary", "Oakwood Academy", "St. Anne's School", "Hillcrest High",
           "Lakeview Elementary", "Northgate College")
BOOKS = ("Dune", "Middlemarch", "The Hobbit", "Beloved", "Rebecca", "Emma", "Persuasion")


def _code(rng: random.Random) -> str:
    word = rng.choice(("Tiger", "Maple", "Copper", "River", "Falcon", "Cedar", "Orbit", "Velvet"))
    return f"{word}{rng.choice(('Moon', 'Stone', 'Leaf', 'Wave', 'Fox'))}#{rng.randrange(10, 99)}"


def _date(rng: random.Random) -> str:
    return f"{rng.choice(MONTHS)} {rng.randrange(1, 29)}"


def _person(rng: random.Random, title: bool = False) -> str:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}" if rng.random() < 0.6 else rng.choice(FIRST)
    return f"Dr. {rng.choice(LAST)}" if title and rng.random() < 0.5 else name


# (statement templates, value maker): "{v}" is the value; several wordings per fact, as people
# type them. Lower-case starts and fillers come from `person`.
def _templates():
    return [
        (("My name is {v}.", "My full name is {v}."), lambda g: f"{g.choice(FIRST)} {g.choice(LAST)}"),
        (("I live in {v}.", "I'm living in {v}.", "My home is in {v}.", "My hometown is {v}."),
         lambda g: g.choice(CITIES)),
        (("I work as a {v}.", "I'm a {v}.", "My job is {v}.", "I work as a {v} now."),
         lambda g: g.choice(JOBS)),
        (("I work at {v}.", "My employer is {v}.", "My company is {v}."), lambda g: g.choice(COMPANIES)),
        (("I have a {pet} named {v}.", "I have a {pet} called {v}.", "My {pet}'s name is {v}.",
          "My {pet} is called {v}."), lambda g: g.choice(PET_NAMES)),
        (("My {rel}'s name is {v}.", "My {rel} is {v}.", "My {rel} is called {v}."), lambda g: _person(g)),
        (("My {role} is {v}.", "My {role}'s name is {v}."), lambda g: _person(g, title=True)),
        (("I drive a {v}.", "My car is a {v}.", "I own a {v}."), lambda g: g.choice(CARS)),
        (("I'm allergic to {v}.", "I am allergic to {v}.", "My allergy is {v}."), lambda g: g.choice(ALLERGENS)),
        (("I was born in {v}.",), lambda g: str(g.randrange(1950, 2006))),
        (("I was born in {v}.", "My birthplace is {v}."), lambda g: g.choice(CITIES)),
        (("My birthday is {v}.", "My birthday is on {v}.", "I was born on {v}."), _date),
        (("My favorite food is {v}.", "My favourite dish is {v}."), lambda g: g.choice(FOODS)),
        (("My favorite hobby is {v}.", "My hobby is {v}.", "My favourite pastime is {v}."),
         lambda g: g.choice(HOBBIES)),
        (("I support the {v}.", "My favorite team is the {v}."), lambda g: g.choice(TEAMS)),
        (("My favorite color is {v}.", "My favourite colour is {v}."), lambda g: g.choice(COLORS)),
        (("I speak {v}.", "My first language is {v}."), lambda g: g.choice(LANGS)),
        (("I play the {v}.",), lambda g: g.choice(INSTRUMENTS)),
        (("My wifi password is {v}.", "My laptop password is {v}.", "My door code is {v}."), _code),
        (("My {rel} lives in {v}.",), lambda g: g.choice(CITIES)),
        (("My {kid} goes to {v}.",), lambda g: g.choice(SCHOOLS)),
        (("My usual drink is a {v}.", "My favorite drink is {v}."), lambda g: g.choice(DRINKS)),
        (("I take my coffee with {v}.", "I usually take my tea with {v}."),
         lambda g: g.choice(("oat milk", "honey", "lemon", "two sugars", "soy milk", "cream"))),
        (("My favorite book is {v}.",), lambda g: g.choice(BOOKS)),
        (("My anniversary is on {v}.", "My gym class starts at {v}."),
         lambda g: _date(g) if g.random() < 0.5 else f"{g.randrange(5, 10)} pm"),
    ]


FILLERS = ("", "", "", "btw ", "By the way, ", "Just so you know, ", "FYI ", "For the record, ", "Oh and ")


def person(rng: random.Random, n_facts: int = 12) -> list[str]:
    """One synthetic person's statements: `n_facts` facts of different kinds, one wording each."""
    templates = _templates()
    picks = rng.sample(templates, min(n_facts, len(templates)))
    out = []
    for forms, value in picks:
        t = rng.choice(forms)
        s = t.format(v=value(rng), pet=rng.choice(PETS), rel=rng.choice(RELATIVES), role=rng.choice(ROLES),
                     kid=rng.choice(("son", "daughter")))
        out.append(s)
    return out


def echo_samples(n_people: int, seed: int, forms_per_fact: int = 3) -> list[tuple[str, str, str]]:
    """(question as typed, reply prefix, answer) samples of `n_people` synthetic people."""
    from engram_local.text.facts import FactInputError, split_statement
    from engram_local.text.questions import question_forms, vary

    rng = random.Random(seed)
    out = []
    for _ in range(n_people):
        for statement in person(rng):
            try:
                prompt, answer = split_statement(statement)
            except FactInputError:
                continue
            forms = question_forms(prompt, answer, limit=None)
            for q, echo in rng.sample(forms, min(forms_per_fact, len(forms))):
                out.append((vary(q, rng), echo, answer))
    return out
