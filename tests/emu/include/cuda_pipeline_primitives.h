// Emulation stand-in: see upreid_emu.h (cp.async through the pipeline primitives).
#pragma once
#include "upreid_emu.h"

#define __pipeline_memcpy_async(dst, src, size_and_align, ...) \
  ::upreid_emu::async_copy(__FILE__, __LINE__, dst, src, size_and_align, ##__VA_ARGS__)
inline void __pipeline_commit() { ::upreid_emu::async_commit(); }
inline void __pipeline_wait_prior(size_t prior) { ::upreid_emu::async_wait_prior(prior); }
