# Build rules for mr apps written in C. An app's Makefile (apps/wc-c):
#
#   APP  := wc-c
#   SRCS := wc.c
#   include ../../guest-sdk/c/mr.mk
#
# `make` builds $(APP).wasm (`make OUT=path/app.wasm` elsewhere). The first
# time, toolchain.sh installs clang 19, lld and wasi-libc from Debian's
# packages. The app and the SDK are compiled for wasm32-wasi as a reactor
# (no main) and linked by wasm-component-ld (it ships with Rust), which makes
# the component: the world's type comes from the bindings' object file, and
# WASI preview 1 calls are adapted to the preview 2 imports mr provides.

MR_C_SDK := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
OUT ?= $(APP).wasm
CLANG ?= clang-19
# -flto: the app and the SDK are optimised as one program, so the SDK's
# word scanner and counting table are inlined into the app's map loop, as
# Rust inlines its SDK (wc-c took 0.8x the time with it, 2026-12-07). clang
# hands wasm-component-ld the wasm-ld of its own LLVM (toolchain.sh installs
# lld-19 for clang-19); with another CLANG whose lld is not installed, an
# older wasm-ld on PATH cannot read its bitcode: install that lld, or build
# with CFLAGS="-O2 -msimd128".
CFLAGS ?= -O2 -msimd128 -flto
MR_C_SOURCES := $(MR_C_SDK)/mr.c $(MR_C_SDK)/mr_component.c $(MR_C_SDK)/bindings/mapreduce.c
MR_C_DEPS := $(MR_C_SOURCES) $(MR_C_SDK)/mr.h $(MR_C_SDK)/mr_letters.h \
	$(MR_C_SDK)/bindings/mapreduce.h $(MR_C_SDK)/bindings/mapreduce_component_type.o

$(OUT): $(SRCS) $(MR_C_DEPS)
	@mkdir -p $(dir $(OUT))
	ld=$$(CLANG=$(CLANG) $(MR_C_SDK)/toolchain.sh) && \
	$(CLANG) --target=wasm32-wasi -mexec-model=reactor $(CFLAGS) -Wall -Wextra \
		-I$(MR_C_SDK) -I$(MR_C_SDK)/bindings $(SRCS) $(MR_C_SOURCES) \
		$(MR_C_SDK)/bindings/mapreduce_component_type.o \
		-fuse-ld=$$ld -Wl,--wasi-adapter=reactor -o $@
	@echo "built $@"

.PHONY: clean
clean:
	rm -f $(OUT)
