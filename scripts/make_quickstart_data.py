"""Writes the bundled quickstart data set: tech-news sentences annotated with PERSON, ORG,
PRODUCT and LOCATION entities (CoNLL, IOB2), made from hand-written templates and entity lists.

    python scripts/make_quickstart_data.py   # rewrites examples/data/quickstart/{train,dev,test}.conll

Deterministic (seed 7). Train, dev and test use disjoint entity names, so the scores measure
generalisation to unseen names rather than memorisation.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

PEOPLE = ["Maria Lopez", "Kenji Watanabe", "Aisha Bello", "Tom Fischer", "Priya Raman", "Lars Eriksen",
          "Chen Wei", "Fatima Haddad", "Olivia Grant", "Diego Alvarez", "Hannah Novak", "Samuel Osei",
          "Ingrid Dahl", "Rahul Mehta", "Sofia Rossi", "Mateo Silva", "Yuki Tanaka", "Grace Kim",
          "Ahmed Nasser", "Elena Petrova", "Noah Becker", "Zara Ahmed", "Lucas Moreau", "Amara Obi"]
ORGS = ["Nimbus Labs", "Orbitel", "Brightwave", "Kestrel Systems", "Halcyon", "Quanta Foods",
        "Vireo Networks", "Solstice Energy", "Tidewater Bank", "Arclight Studios", "Pinecone AI",
        "Meridian Motors", "Bluefin Robotics", "Cobalt Health", "Lumen Air", "Granite Cloud",
        "Northwind Media", "Sparrow Mobile", "Atlas Freight", "Juniper Bio", "Redshift Games",
        "Harbor Labs", "Falcon Optics", "Ember Tech"]
PRODUCTS = ["Pixel Slate", "AeroBook 14", "Nova Watch", "Echo Buds", "Zephyr X2", "Quill Pen",
            "Helix Router", "Comet Drone", "Orion Lens", "Atlas Tablet", "Vega Phone", "Prism TV",
            "Nimbus Drive", "Spark Hub", "Terra Bike", "Lyra Speaker", "Photon Cam", "Aurora Lamp",
            "Falcon Glasses", "Tempo Band", "Mosaic OS", "Cirrus Car", "Glide Board", "Pulse Ring"]
PLACES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Berlin", "Austin", "Melbourne", "Bogota",
          "Seoul", "Dublin", "Lagos", "Oslo", "Mumbai", "Denver", "Warsaw", "Cape Town", "Helsinki",
          "Lima", "Taipei", "Boston", "Accra", "Zurich", "Manila", "Porto"]

TEMPLATES = [
    "{ORG} unveiled the {PRODUCT} at a packed event in {LOCATION} on Tuesday .",
    "{PERSON} , the chief executive of {ORG} , said the {PRODUCT} will ship in March .",
    "Reviewers praised the battery life of the new {PRODUCT} from {ORG} .",
    "{ORG} is opening a research office in {LOCATION} led by {PERSON} .",
    "I finally bought the {PRODUCT} and it is honestly great .",
    "{PERSON} left {ORG} after six years to start a company in {LOCATION} .",
    "Shares of {ORG} rose four percent after the {PRODUCT} launch .",
    "The {PRODUCT} is sold out in {LOCATION} again .",
    "{ORG} and {ORG} announced a partnership on Monday .",
    "According to {PERSON} , sales of the {PRODUCT} doubled last quarter .",
    "Thousands queued outside the {ORG} store in {LOCATION} .",
    "{PERSON} demoed the {PRODUCT} live on stage .",
    "Does anyone know if the {PRODUCT} works with the {PRODUCT} ?",
    "{ORG} fined for misleading ads about the {PRODUCT} .",
    "The conference in {LOCATION} opened with a talk by {PERSON} of {ORG} .",
    "My {PRODUCT} stopped charging after the last update .",
    "{ORG} will build a new factory near {LOCATION} , creating 800 jobs .",
    "{PERSON} joins {ORG} as head of design .",
    "Leaked photos show the {PRODUCT} in a new blue finish .",
    "{ORG} cut the price of the {PRODUCT} by a third .",
    "We met {PERSON} at the {ORG} booth in {LOCATION} .",
    "Analysts expect {ORG} to report record revenue this week .",
    "The {PRODUCT} beats the {PRODUCT} in every benchmark we ran .",
    "{PERSON} and {PERSON} founded {ORG} in {LOCATION} in 2019 .",
    "Is the {PRODUCT} worth it over last year 's model ?",
    "{ORG} recalled 20,000 units of the {PRODUCT} over a battery fault .",
    "Flights from {LOCATION} to {LOCATION} now offer free wifi on {ORG} .",
    "{PERSON} tweeted that the {PRODUCT} arrives in {LOCATION} next month .",
    "The weather was lovely and nobody talked about work at all .",
    "Battery prices keep falling , which helps every phone maker .",
    "{ORG} hired {PERSON} to run its {LOCATION} office .",
    "A teardown of the {PRODUCT} reveals a larger cooling fan .",
    "{ORG} opened pre-orders for the {PRODUCT} in {LOCATION} and {LOCATION} .",
    "{PERSON} called the {PRODUCT} the best thing {ORG} has made .",
    "The startup scene in {LOCATION} keeps growing .",
    "Customers in {LOCATION} report outages on {ORG} 's network .",
    "{PERSON} will keynote the developer day in {LOCATION} .",
    "Our team switched from the {PRODUCT} to the {PRODUCT} last month .",
    "{ORG} denied rumours that it is buying {ORG} .",
    "Nobody expected the update to break so many devices .",
]
KIND = {"PERSON": ("person", PEOPLE), "ORG": ("org", ORGS), "PRODUCT": ("product", PRODUCTS),
        "LOCATION": ("location", PLACES)}


def make_sentence(template: str, pools: dict[str, list[str]], rng: random.Random) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for piece in template.split():
        m = re.fullmatch(r"\{(\w+)\}", piece)
        if not m:
            rows.append((piece, "O"))
            continue
        label, _ = KIND[m.group(1)]
        words = rng.choice(pools[m.group(1)]).split()
        rows += [(w, ("B-" if i == 0 else "I-") + label) for i, w in enumerate(words)]
    return rows


def split_pools(rng: random.Random) -> dict[str, dict[str, list[str]]]:
    """Disjoint entity names per split: 16 train, 4 dev, 4 test of each kind."""
    out: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}, "test": {}}
    for kind, (_, names) in KIND.items():
        shuffled = names[:]
        rng.shuffle(shuffled)
        out["train"][kind], out["dev"][kind], out["test"][kind] = shuffled[:16], shuffled[16:20], shuffled[20:]
    return out


def main() -> None:
    rng = random.Random(7)
    pools = split_pools(rng)
    folder = Path(__file__).resolve().parent.parent / "examples" / "data" / "quickstart"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 200), ("dev", 50), ("test", 50)):
        lines = []
        for _ in range(count):
            for word, tag in make_sentence(rng.choice(TEMPLATES), pools[split], rng):
                lines.append(f"{word}\t{tag}")
            lines.append("")
        (folder / f"{split}.conll").write_text("\n".join(lines), encoding="utf-8")
        print(f"wrote {folder / (split + '.conll')}: {count} sentences")


if __name__ == "__main__":
    main()
