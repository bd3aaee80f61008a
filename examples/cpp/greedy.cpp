// Minimal app on the ONNX Runtime C++ API: load an edgecompress artifact, run a prompt's token ids
// through a greedy KV-cache loop, print the generated ids.
//
//   greedy ARTIFACT_DIR MAX_NEW_TOKENS TOKEN_ID [TOKEN_ID ...]
//
// The app has no tokenizer (tokenize with the artifact's tokenizer.json elsewhere). Everything it needs
// comes from the graph's I/O (layer count, KV heads, head size) and genai_config.json (eos ids).
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

static std::vector<int64_t> eos_ids(const std::string& folder) {
  std::ifstream file(folder + "/genai_config.json");
  std::stringstream text;
  text << file.rdbuf();
  std::string json = text.str();
  std::smatch match;  // "eos_token_id": 2  or  "eos_token_id": [2, 3]
  std::vector<int64_t> ids;
  if (std::regex_search(json, match, std::regex("\"eos_token_id\"\\s*:\\s*\\[?([0-9,\\s]*)"))) {
    std::stringstream list(match[1].str());
    for (std::string item; std::getline(list, item, ',');)
      if (item.find_first_of("0123456789") != std::string::npos) ids.push_back(std::stoll(item));
  }
  return ids;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR MAX_NEW_TOKENS TOKEN_ID [TOKEN_ID ...]\n";
    return 2;
  }
  const std::string folder = argv[1];
  const int max_new_tokens = std::stoi(argv[2]);
  std::vector<int64_t> step_ids;
  for (int i = 3; i < argc; ++i) step_ids.push_back(std::stoll(argv[i]));
  const std::vector<int64_t> eos = eos_ids(folder);

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "greedy");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(2);
    Ort::Session session(env, (folder + "/model.onnx").c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;

    // Graph I/O, in the session's order. past_key_values.{i}.{key,value} → present.{i}.{key,value}.
    std::vector<std::string> input_names, output_names;
    for (size_t i = 0; i < session.GetInputCount(); ++i)
      input_names.push_back(session.GetInputNameAllocated(i, allocator).get());
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    std::vector<int64_t> kv_shape;  // [batch, kv_heads, past, head_dim]
    ONNXTensorElementDataType kv_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // fp16 in a GPU target's artifact
    for (size_t i = 0; i < input_names.size(); ++i)
      if (input_names[i] == "past_key_values.0.key") {
        Ort::TypeInfo type_info = session.GetInputTypeInfo(i);  // owns what the view below reads
        auto info = type_info.GetTensorTypeAndShapeInfo();
        kv_shape = info.GetShape();
        kv_type = info.GetElementType();
      }
    if (kv_shape.size() != 4) throw std::runtime_error("no past_key_values.0.key input");

    // The cache, by name, in the graph's cache dtype; it starts empty (past length 0). Logits are fp32 always.
    std::vector<std::string> cache_names;
    std::vector<Ort::Value> cache;
    for (const auto& name : input_names)
      if (name.rfind("past_key_values.", 0) == 0) {
        cache_names.push_back(name);
        std::vector<int64_t> shape = {1, kv_shape[1], 0, kv_shape[3]};
        cache.push_back(Ort::Value::CreateTensor(allocator, shape.data(), shape.size(), kv_type));
      }

    std::vector<const char*> in_names, out_names;
    for (const auto& n : input_names) in_names.push_back(n.c_str());
    for (const auto& n : output_names) out_names.push_back(n.c_str());
    Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    int64_t past = 0;
    std::vector<int64_t> generated;
    while (static_cast<int>(generated.size()) < max_new_tokens) {
      const int64_t step = static_cast<int64_t>(step_ids.size());
      std::vector<int64_t> mask(past + step, 1), positions(step);
      for (int64_t i = 0; i < step; ++i) positions[i] = past + i;
      std::vector<int64_t> ids_shape = {1, step}, mask_shape = {1, past + step};

      std::vector<Ort::Value> inputs;
      for (const auto& name : input_names) {
        if (name == "input_ids")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, step_ids.data(), step, ids_shape.data(), 2));
        else if (name == "attention_mask")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), mask_shape.data(), 2));
        else if (name == "position_ids")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, positions.data(), step, ids_shape.data(), 2));
        else {
          auto at = std::find(cache_names.begin(), cache_names.end(), name) - cache_names.begin();
          inputs.push_back(std::move(cache[at]));
        }
      }
      auto outputs = session.Run(Ort::RunOptions{nullptr}, in_names.data(), inputs.data(), inputs.size(),
                                 out_names.data(), out_names.size());

      int64_t token = 0;
      for (size_t i = 0; i < output_names.size(); ++i) {
        const std::string& name = output_names[i];
        if (name == "logits") {
          auto shape = outputs[i].GetTensorTypeAndShapeInfo().GetShape();  // [1, step, vocab]
          const float* last = outputs[i].GetTensorData<float>() + (shape[1] - 1) * shape[2];
          token = std::max_element(last, last + shape[2]) - last;
        } else if (name.rfind("present.", 0) == 0) {  // present.i.key feeds past_key_values.i.key
          std::string past_name = "past_key_values." + name.substr(8);
          auto at = std::find(cache_names.begin(), cache_names.end(), past_name) - cache_names.begin();
          cache[at] = std::move(outputs[i]);
        }
      }
      past += step;
      generated.push_back(token);
      if (std::find(eos.begin(), eos.end(), token) != eos.end()) break;
      step_ids = {token};
    }
    for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? " " : "") << generated[i];
    std::cout << "\n";
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
