"""Built-in calibration prompts (chat style, mixed code / math / prose), one per line in
``calibration_prompts.txt`` (the file ``river-export --calibrate`` can be given directly).

They must never overlap the benchmark's evaluation sets; a test checks that.
"""

from pathlib import Path

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
CALIBRATION_PROMPTS = [line.strip() for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
