// The Catch2 runner of the C++ tests (one per executable).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
