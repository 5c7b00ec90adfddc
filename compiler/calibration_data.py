"""Built-in calibration prompts (chat style, mixed code / math / prose).

They must never overlap the evaluation sets in ``river.runtime.eval_data``; a test checks that.
"""

CALIBRATION_PROMPTS = [
    "Write a Python function that returns the largest element of a list.",
    "How many minutes are there in three and a half hours?",
    "Give two reasons why bees matter for farms.",
    "Write a short story opening about a lighthouse keeper.",
    "What does the HTTP status code 404 mean?",
    "A bag holds 5 red and 3 blue marbles. How many marbles are in 4 such bags?",
    "Explain what a hash table is in simple words.",
    "Write a JavaScript function that reverses a string.",
    "Name three famous bridges and where they are.",
    "If a car uses 6 liters of fuel per 100 km, how much does it use for 250 km?",
    "Describe how to make a cup of tea.",
    "Write a SQL query that counts the rows of a table named orders.",
    "What is the difference between weather and climate?",
    "Sara reads 12 pages a day. How many days does she need for a 180 page book?",
    "Write a Python class for a simple bank account with deposit and withdraw.",
    "List four vegetables that grow underground.",
    "Explain recursion with a small example.",
    "A rectangle is 7 cm wide and 12 cm long. What is its area?",
    "Write a limerick about a sleepy cat.",
    "What are the three states of matter?",
    "Write a Python function that counts the vowels in a string.",
    "Why do we have seasons on Earth?",
    "A train leaves at 9:40 and arrives at 13:15. How long is the trip?",
    "Give some advice for a first job interview.",
    "Write a bash command that lists files sorted by size.",
    "Summarize the idea of supply and demand.",
    "Tom buys 3 notebooks at 4 dollars each and a pen for 2 dollars. What does he pay?",
    "Write a Python generator that yields the squares of numbers up to n.",
    "What is photosynthesis?",
    "Describe a calm morning at the beach.",
]
