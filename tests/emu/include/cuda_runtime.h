// Emulation stand-in: see upreid_emu.h.
#pragma once
#include "upreid_emu.h"
