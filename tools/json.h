// A JSON string literal of any text (quotes, backslashes and control characters escaped), for
// the JSON the tools write (bench results, traces).
#pragma once

#include <cstdio>
#include <string>

namespace sp::train {

inline std::string json_str(const std::string& v) {
  std::string out = "\"";
  for (const char c : v) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(static_cast<unsigned char>(c)));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

}  // namespace sp::train
