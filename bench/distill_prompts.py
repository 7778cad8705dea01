"""The prompts the demo drafter was distilled on: instruction-style prose openings, code openings and chat requests,
templates x topics, shuffled with a fixed seed; none shares a word 5-gram with gemma_mlx/demo_prompts.json.

    python -m bench.distill_prompts OUT.txt     # then: gemma-mlx distill --prompts OUT.txt ...
"""
import json
import random
import re
import sys
from pathlib import Path
topics = """volcanoes|the moon|honey bees|the printing press|coral reefs|the Roman Empire|photosynthesis|earthquakes|
the internet|penguins|the Sahara desert|chess|jazz music|the human skeleton|rain forests|the Eiffel Tower|tides|
windmills|the Olympic Games|dinosaurs|the solar system|coffee|bread baking|the Nile river|elephants|the violin|
clouds|recycling|the immune system|bicycles|trains|the Great Barrier Reef|owls|the Arctic|maple syrup|bridges|
castles|the stock market|democracy|vitamins|sleep|the ocean floor|comets|mushrooms|the heart|paper|glass|silk|
the steam engine|satellites|rainbows in science|wolves|the Amazon river|mountains|deserts|pyramids|libraries|
museums|gardening|composting|electric cars|solar panels|wind energy|batteries|magnets|gravity|light|sound|
fire|salt|sugar|chocolate|cheese|rice|potatoes|tomatoes|apples|oranges|whales|sharks|dolphins|octopuses|
butterflies|ants|spiders|frogs|snakes|horses|dogs|cats|parrots|eagles|the alphabet|numbers|clocks|calendars|
maps|compasses|telescopes|microscopes|vaccines|antibiotics|hospitals|schools|universities|newspapers|radio|
television|cameras|computers|smartphones|video games|robots|airplanes|rockets|submarines|ships|cars|roads|
cities|villages|farms|forests|rivers|lakes|islands|caves|glaciers in history|snow|thunderstorms|hurricanes|
tornadoes|seasons|the weather|climate change|water|air|soil|rocks|diamonds|gold|iron|copper|the Industrial Revolution|
ancient Greece|the Vikings|the Middle Ages|the Silk Road trade|samurai|knights|pirates|explorers|astronauts|
doctors|teachers|firefighters|chefs|artists|musicians|painting|sculpture|poetry|novels|theatre|dance|football|
tennis|swimming|running|yoga|meditation|friendship|kindness|patience|honesty|courage|time management|budgeting|
saving money|cooking pasta|making soup|baking cookies|planting trees|learning a language|public speaking|
writing essays|reading books|studying for exams|moving house|travelling by train|visiting Paris|a trip to Japan|
hiking|camping in winter|fishing|birdwatching|photography|knitting|woodworking|pottery|origami|board games|
puzzles|magic tricks|the piano|drums|guitars in rock music|opera|birthdays|weddings|holidays|New Year|spring|
summer|autumn|winter""".replace("\n", "").split("|")
topics = [t.strip() for t in topics if t.strip()]
prose = ["{T} are", "{T} is", "The history of {t} began", "Most people do not know that {t}", "Scientists study {t} because",
         "A short guide to {t}:", "Here are some facts about {t}:", "Once upon a time, a child who loved {t}",
         "In the early days, {t}", "The most important thing about {t} is", "There are three reasons why {t}",
         "Q: What is special about {t}?\nA:", "Chapter 1: {T}\n\n", "{T} have changed over the centuries.",
         "If you want to understand {t}, you should", "My grandmother always told me about {t}.",
         "The first time I saw {t},", "Many cultures around the world see {t} as"]
chat = ["Tell me about {t}.", "What is interesting about {t}?", "Explain {t} in simple words.", "Write a short story about {t}.",
        "Write a poem about {t}.", "Give me five facts about {t}.", "Why are {t} important?", "How do {t} work?",
        "What should a beginner know about {t}?", "Summarize the history of {t}.", "Write a paragraph about {t} for children.",
        "List some pros and cons of {t}.", "Can you describe {t}?", "Give me three tips about {t}.",
        "Write a short blog post about {t}.", "What are common myths about {t}?", "Explain {t} to a ten-year-old.",
        "Write a limerick about {t}.", "What would happen without {t}?", "Compare {t} and {u}."]
names = """add_numbers|reverse_string|is_palindrome|factorial|fizzbuzz|merge_sorted|binary_search|flatten_list|
count_vowels|celsius_to_fahrenheit|read_lines|unique_items|max_of_list|average|median|word_lengths|capitalize_words|
remove_duplicates|chunk_list|sum_digits|gcd|lcm|is_leap_year|days_between|parse_csv_line|to_snake_case|
to_camel_case|rotate_list|transpose|dot_product|matrix_multiply|fibonacci_list|primes_below|is_anagram|char_frequency|
longest_word|validate_email|clamp|lerp|distance|area_of_circle|bubble_sort|insertion_sort|quick_sort|deep_copy|
group_by_length|invert_dict|safe_divide|retry|memoize|timer|read_json|write_json|slugify|truncate|pad_left|
roman_to_int|int_to_roman|balanced_brackets|running_total""".replace("\n", "").split("|")
code = ['def {n}(', 'def {n}(items):\n    """', '# Python: {h}\ndef {n}(', 'class {C}:\n    """', 'import math\n\n\ndef {n}(',
        'def {n}(text):\n    ', 'def test_{n}():\n    assert', 'for item in items:\n    # {h}\n', 'def {n}(a, b):\n    """Return']
chat_code = ["Write a Python function called {n}.", "How do I write {h} in Python?", "Explain what this code does: def {n}(x): pass",
             "Write a JavaScript function for {h}.", "Show me a Python example of {h}."]
rng = random.Random(0)
out = set()
for t in topics:
    for tpl in rng.sample(prose, 5):
        out.add(tpl.format(t=t, T=t[0].upper() + t[1:]))
    for tpl in rng.sample(chat, 6):
        out.add(tpl.format(t=t, u=rng.choice(topics)))
for n in names:
    h = n.replace("_", " ")
    C = "".join(w.capitalize() for w in n.split("_"))
    for tpl in code:
        out.add(tpl.format(n=n, h=h, C=C))
    for tpl in rng.sample(chat_code, 3):
        out.add(tpl.format(n=n, h=h))
demo = json.loads((Path(__file__).resolve().parent.parent / "gemma_mlx" / "demo_prompts.json").read_text())
def grams(s, n=5):
    w = re.findall(r"\w+", s.lower()); return {tuple(w[i:i+n]) for i in range(len(w) - n + 1)}
demo_grams = set().union(*(grams(x) for v in demo.values() for _, x in v))
out = [p for p in sorted(out) if not grams(p) & demo_grams]
rng.shuffle(out)
PROMPTS = out

if __name__ == "__main__":
    Path(sys.argv[1]).write_text("\n".join(p.replace("\n", "\\n") for p in out) + "\n")
    print(f"{len(out)} prompts")
