"""The prompts the demo drafter was distilled on: instruction-style prose openings, code openings and chat requests,
templates x topics, shuffled with a fixed seed; none shares a word 5-gram with gemma_mlx/demo_prompts.json.

    python -m bench.distill_prompts OUT.txt     # then: gemma-mlx distill --prompts OUT.txt ...
    python -m bench.distill_prompts OUT.txt 2   # set 2: the template x topic pairs set 1 left out, and new functions
                                                # (for gemma-mlx distill --init DRAFTER: new text, not set 1's again)
    python -m bench.distill_prompts OUT.txt 3   # set 3: real code openings (a function's or class's signature and
                                                # docstring line, from this Python's standard library, PSF licence),
                                                # mixed with as many prompts of sets 1 and 2
"""
import ast
import json
import random
import re
import sys
import sysconfig
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
names2 = """word_count|sort_by_key|filter_even|square_all|find_index|last_item|count_lines|split_words|join_paths|
file_size|to_upper|strip_spaces|is_even|is_sorted|swap_pairs|zip_lists|cumulative_sum|product_of_list|min_max|
normalize|mean_squared_error|softmax|sigmoid|relu|matrix_transpose|identity_matrix|parse_date|format_time|
seconds_to_hours|hex_to_rgb|rgb_to_hex|caesar_cipher|encode_base64|hash_password|random_password|shuffle_list|
sample_items|weighted_choice|top_k|most_common|histogram|percentile|variance|standard_deviation|is_power_of_two|
count_bits|reverse_words|title_case|remove_punctuation|is_numeric|parse_int|safe_get|merge_dicts|flatten_dict|
sort_dict|filter_dict|dict_to_list|list_to_dict|queue_push|stack_pop""".replace("\n", "").split("|")


def grams(s, n=5):
    w = re.findall(r"\w+", s.lower())
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def prompts(which: int = 1) -> list[str]:
    """Set 1 (what the demo drafter was first distilled on), set 2 (the template x topic pairs set 1 left out, every
    code-chat template, other function names) or set 3 (`stdlib_openings`, with as many of sets 1 and 2), shuffled
    with a fixed seed, without the demo prompts' 5-grams."""
    rng, other, out = random.Random(0), random.Random(2), set()
    if which == 3:
        code_openings = stdlib_openings()
        out = set(code_openings) | set(random.Random(3).sample(prompts(1) + prompts(2), len(code_openings)))
    else:
        out = templated(which, rng, other)
    demo = json.loads((Path(__file__).resolve().parent.parent / "gemma_mlx" / "demo_prompts.json").read_text())
    demo_grams = set().union(*(grams(x) for v in demo.values() for _, x in v))
    out = [p for p in sorted(out) if not grams(p) & demo_grams]
    rng.shuffle(out)
    return out


def templated(which: int, rng: random.Random, other: random.Random) -> set[str]:
    out = set()
    for t in topics:
        chosen_prose = rng.sample(prose, 5)
        chosen_chat = [(tpl, rng.choice(topics)) for tpl in rng.sample(chat, 6)]
        if which == 2:
            chosen_prose = [x for x in prose if x not in chosen_prose]
            chosen_chat = [(x, other.choice(topics)) for x in chat if x not in dict(chosen_chat)]
        for tpl in chosen_prose:
            out.add(tpl.format(t=t, T=t[0].upper() + t[1:]))
        for tpl, u in chosen_chat:
            out.add(tpl.format(t=t, u=u))
    for n in names if which == 1 else names2:
        h = n.replace("_", " ")
        C = "".join(w.capitalize() for w in n.split("_"))
        for tpl in code:
            out.add(tpl.format(n=n, h=h, C=C))
        for tpl in rng.sample(chat_code, 3) if which == 1 else chat_code:
            out.add(tpl.format(n=n, h=h))
    return out


def stdlib_openings() -> list[str]:
    """How a public function or class of the standard library opens, as the demo's code prompts do: its signature
    and the first line of its docstring (a class: also its __init__'s signature), at most one per name."""
    out, seen = [], set()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(part in ("test", "tests", "idlelib", "lib2to3", "site-packages") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:
            opening = _opening(node)
            if opening and node.name not in seen:
                seen.add(node.name)
                out.append(opening)
    return out


def _opening(node) -> str | None:
    if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        return None
    doc = (ast.get_docstring(node) or "").split("\n")[0].strip()
    if not 10 <= len(doc) <= 90 or not doc.endswith(".") or '"""' in doc or "\\" in doc:
        return None
    if isinstance(node, ast.FunctionDef):
        return f'{_signature(node)}\n    """{doc}"""\n'
    init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    bases = "(" + ", ".join(ast.unparse(b) for b in node.bases) + ")" if node.bases else ""
    head = f'class {node.name}{bases}:\n    """{doc}"""\n'
    return head + ("\n    " + _signature(init) + "\n" if init else "")


def _signature(fn: ast.FunctionDef) -> str:
    return f"def {fn.name}({ast.unparse(fn.args)}):"


PROMPTS = prompts(1) + prompts(2) + prompts(3)  # every prompt a demo drafter was distilled on

if __name__ == "__main__":
    out = prompts(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    Path(sys.argv[1]).write_text("\n".join(p.replace("\n", "\\n") for p in out) + "\n")
    print(f"{len(out)} prompts")
