# The README's one-command set-up, demo and tests. PYTHON may point at another interpreter (3.10-3.12).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= ./test/deberta
SEQ    ?= 512

.PHONY: setup demo test clean

$(BIN)/activate: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	touch $(BIN)/activate

setup: $(BIN)/activate

# Export the demo config, write the original, plugin and correctness-check models, check them under ONNX Runtime.
demo: setup
	$(BIN)/python deberta_pytorch2onnx.py --filename $(DEMO).onnx --seq-len $(SEQ)
	$(BIN)/python deberta_onnx_modify.py $(DEMO).onnx
	$(BIN)/python deberta_onnx_modify.py $(DEMO).onnx --plugin
	$(BIN)/python deberta_onnx_modify.py $(DEMO).onnx --correctness-check
	$(BIN)/python deberta_ort_inference.py --onnx $(DEMO) --correctness-check fp32

test: setup
	$(BIN)/python -m pytest test/suite -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
