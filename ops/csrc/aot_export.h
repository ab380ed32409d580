// Exported entry points of MindSpore's AOT custom operators.
#pragma once

// No C++ exception may cross into MindSpore: MINDPORT_EXPORT(Name) defines the C entry point
// `Name`, which runs `NameBody` in a try block and turns a failure (e.g. std::bad_alloc, thread
// creation) into a nonzero return. Use it inside extern "C" { ... }.
#define MINDPORT_EXPORT(name)                                                                        \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
           void *extra) {                                                                            \
    try {                                                                                            \
      return name##Body(nparam, params, ndims, shapes, dtypes, stream, extra);                       \
    } catch (...) {                                                                                  \
      return 99;                                                                                     \
    }                                                                                                \
  }
