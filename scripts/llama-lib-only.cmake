# Included right after llama.cpp's project() when llama-cpp-python is built
# (-DCMAKE_PROJECT_llama.cpp_INCLUDE=..., from scripts/install-llama-cpp).
#
# llama-cpp-python forces LLAMA_BUILD_COMMON on in CMake's cache for its multimodal library
# (mtmd, which LLAVA_BUILD=OFF leaves out). qwen-edge loads only libllama and libggml*: llama.cpp's
# common library and its HTTP client would be compiled and shipped for nothing, and on a Pi, or
# under emulation, they are a large share of the build. A normal variable shadows the cache entry
# inside llama.cpp's directory, and option() keeps it (policy CMP0077, NEW from CMake 3.13).
set(LLAMA_BUILD_COMMON OFF)
